//! The condition language shared by triggers, absence checks and FilterUsers:
//! attribute conditions on one event, history conditions on a user's aggregated events, combined
//! with all/any/not. Validation happens once, at submission; evaluation never fails.
//!
//! This module knows nothing of gRPC or sled: callers look attribute types up through a closure
//! and feed history aggregates through an [`Accumulator`].

use serde::{Deserialize, Serialize};

use crate::domain::model::{AttributeType, Event, NumberAggregate, UserNameAggregate, Value};
use crate::domain::rules::{self, Limits};
use crate::domain::typing;
use crate::error::{invalid, Error};

/// A comparison operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Operator {
    Eq,
    Ne,
    Gt,
    Gte,
    Lt,
    Lte,
    Contains,
    StartsWith,
    In,
    Exists,
    NotExists,
}

impl std::fmt::Display for Operator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Operator::Eq => "EQ",
            Operator::Ne => "NE",
            Operator::Gt => "GT",
            Operator::Gte => "GTE",
            Operator::Lt => "LT",
            Operator::Lte => "LTE",
            Operator::Contains => "CONTAINS",
            Operator::StartsWith => "STARTS_WITH",
            Operator::In => "IN",
            Operator::Exists => "EXISTS",
            Operator::NotExists => "NOT_EXISTS",
        })
    }
}

impl std::fmt::Display for Aggregate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Aggregate::Count => "COUNT",
            Aggregate::Sum => "SUM",
            Aggregate::Min => "MIN",
            Aggregate::Max => "MAX",
            Aggregate::Avg => "AVG",
            Aggregate::DistinctUsers => "DISTINCT_USERS",
        })
    }
}

impl Operator {
    fn is_ordering(self) -> bool {
        matches!(self, Operator::Gt | Operator::Gte | Operator::Lt | Operator::Lte)
    }
}

/// An aggregate over events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Aggregate {
    Count,
    Sum,
    Min,
    Max,
    Avg,
    DistinctUsers,
}

/// A validated condition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) enum Condition {
    All(Vec<Condition>),
    Any(Vec<Condition>),
    Not(Box<Condition>),
    Attribute(AttributeCondition),
    History(HistoryCondition),
}

/// Compares one attribute of an event; `values` are already coerced to the attribute's type.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct AttributeCondition {
    pub attribute: String,
    pub op: Operator,
    pub values: Vec<Value>,
}

/// Aggregates a user's events named `event_name` matching `filter` over a window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct HistoryCondition {
    pub event_name: String,
    pub filter: Option<Box<Condition>>,
    pub aggregate: Aggregate,
    pub attribute: String,
    pub op: Operator,
    pub value: f64,
    /// Window length in nanoseconds; `None` means all history.
    pub within_nanos: Option<i128>,
}

/// A condition as submitted, before validation (the API layer builds it from the wire).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) enum RawCondition {
    All(Vec<RawCondition>),
    Any(Vec<RawCondition>),
    Not(Option<Box<RawCondition>>),
    Attribute {
        attribute: String,
        op: Option<Operator>,
        value: Option<Value>,
        values: Vec<Value>,
    },
    History {
        event_name: String,
        filter: Option<Box<RawCondition>>,
        aggregate: Option<Aggregate>,
        attribute: String,
        op: Option<Operator>,
        value: f64,
        within_nanos: Option<i128>,
    },
    /// A Condition with no kind set.
    Empty,
}

/// Where a condition stands, which decides the kinds it may contain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Place {
    /// A trigger's condition: attribute and history conditions.
    Trigger,
    /// A FilterUsers filter: history conditions only at the top.
    Filter,
    /// A history condition's `where`: attribute conditions only.
    Where,
}

/// The size of a condition: its nodes, its deepest nesting and its history conditions.
#[derive(Debug, Default, PartialEq, Eq)]
struct Size {
    nodes: usize,
    depth: usize,
    histories: usize,
}

fn size_of(raw: &RawCondition, depth: usize, size: &mut Size) {
    size.nodes += 1;
    size.depth = size.depth.max(depth);
    match raw {
        RawCondition::All(items) | RawCondition::Any(items) => {
            items.iter().for_each(|c| size_of(c, depth + 1, size));
        }
        RawCondition::Not(inner) => {
            if let Some(c) = inner {
                size_of(c, depth + 1, size);
            }
        }
        RawCondition::History { filter, .. } => {
            size.histories += 1;
            if let Some(f) = filter {
                size_of(f, depth + 1, size);
            }
        }
        RawCondition::Attribute { .. } | RawCondition::Empty => {}
    }
}

/// Checks that a condition stays within the limits on its size, which bound what evaluating it
/// costs (on the writer, for a trigger; per query, for a filter).
pub(crate) fn check_size(raw: &RawCondition, field: &str, limits: &Limits) -> Result<(), Error> {
    let mut size = Size::default();
    size_of(raw, 1, &mut size);
    if size.nodes > limits.max_condition_nodes {
        return Err(invalid(format!(
            "{field}: {} conditions, at most {} allowed (max_condition_nodes)",
            size.nodes, limits.max_condition_nodes
        )));
    }
    if size.depth > limits.max_condition_depth {
        return Err(invalid(format!(
            "{field}: nested {} levels deep, at most {} allowed (max_condition_depth)",
            size.depth, limits.max_condition_depth
        )));
    }
    if size.histories > limits.max_history_conditions {
        return Err(invalid(format!(
            "{field}: {} history conditions, at most {} allowed (max_history_conditions)",
            size.histories, limits.max_history_conditions
        )));
    }
    Ok(())
}

/// Validates `raw` at `field` (a path such as `trigger.condition`), coercing comparison values
/// with the attribute types `type_of` knows (undefined attributes answer `None`).
pub(crate) fn validate(
    raw: &RawCondition,
    field: &str,
    place: Place,
    type_of: &dyn Fn(&str) -> Option<AttributeType>,
    max_attribute_name_chars: usize,
) -> Result<Condition, Error> {
    let list = |items: &[RawCondition], kind: &str| -> Result<Vec<Condition>, Error> {
        items
            .iter()
            .enumerate()
            .map(|(i, c)| {
                validate(
                    c,
                    &format!("{field}.{kind}.conditions[{i}]"),
                    place,
                    type_of,
                    max_attribute_name_chars,
                )
            })
            .collect()
    };
    match raw {
        RawCondition::All(items) => Ok(Condition::All(list(items, "all")?)),
        RawCondition::Any(items) => Ok(Condition::Any(list(items, "any")?)),
        RawCondition::Not(None) => Err(invalid(format!("{field}.not: a condition is required"))),
        RawCondition::Not(Some(inner)) => Ok(Condition::Not(Box::new(validate(
            inner,
            &format!("{field}.not"),
            place,
            type_of,
            max_attribute_name_chars,
        )?))),
        RawCondition::Empty => Err(invalid(format!(
            "{field}: no condition kind set (all, any, not, attribute or history)"
        ))),
        RawCondition::Attribute {
            attribute,
            op,
            value,
            values,
        } => {
            if place == Place::Filter {
                return Err(invalid(format!(
                    "{field}.attribute: attribute conditions are only allowed inside a history condition's where"
                )));
            }
            let field = format!("{field}.attribute");
            validate_attribute(
                &field,
                attribute,
                *op,
                value.as_ref(),
                values,
                type_of,
                max_attribute_name_chars,
            )
            .map(Condition::Attribute)
        }
        RawCondition::History { .. } => validate_history(
            raw,
            &format!("{field}.history"),
            place,
            type_of,
            max_attribute_name_chars,
        ),
    }
}

/// Validates a history condition at `field` (its path ends with `.history`).
fn validate_history(
    raw: &RawCondition,
    field: &str,
    place: Place,
    type_of: &dyn Fn(&str) -> Option<AttributeType>,
    max_attribute_name_chars: usize,
) -> Result<Condition, Error> {
    let RawCondition::History {
        event_name,
        filter,
        aggregate,
        attribute,
        op,
        value,
        within_nanos,
    } = raw
    else {
        return Err(Error::Internal(format!("{field}: not a history condition")));
    };
    if place == Place::Where {
        return Err(invalid(format!(
            "{field}: a history condition's where may hold attribute conditions only"
        )));
    }
    let event_name = rules::normalize_event_name(&format!("{field}.event_name"), event_name)?;
    let filter = match filter {
        Some(f) => Some(Box::new(validate(
            f,
            &format!("{field}.where"),
            Place::Where,
            type_of,
            max_attribute_name_chars,
        )?)),
        None => None,
    };
    let aggregate = aggregate.unwrap_or(Aggregate::Count);
    match aggregate {
        Aggregate::DistinctUsers => {
            return Err(invalid(format!(
                "{field}.aggregate: DISTINCT_USERS is for statistics only"
            )))
        }
        Aggregate::Count => {}
        Aggregate::Sum | Aggregate::Min | Aggregate::Max | Aggregate::Avg => {
            rules::check_number_attribute(
                &format!("{field}.attribute"),
                aggregate,
                attribute,
                type_of,
                max_attribute_name_chars,
            )?;
        }
    }
    let op = match op {
        Some(
            o @ (Operator::Eq | Operator::Ne | Operator::Gt | Operator::Gte | Operator::Lt | Operator::Lte),
        ) => *o,
        _ => {
            return Err(invalid(format!(
                "{field}.op: must be one of EQ, NE, GT, GTE, LT, LTE"
            )))
        }
    };
    if !value.is_finite() {
        return Err(invalid(format!("{field}.value: must be a finite number")));
    }
    if let Some(w) = within_nanos {
        if *w <= 0 {
            return Err(invalid(format!("{field}.within: must be positive")));
        }
    }
    Ok(Condition::History(HistoryCondition {
        event_name,
        filter,
        aggregate,
        attribute: attribute.clone(),
        op,
        value: *value,
        within_nanos: *within_nanos,
    }))
}

fn validate_attribute(
    field: &str,
    attribute: &str,
    op: Option<Operator>,
    value: Option<&Value>,
    values: &[Value],
    type_of: &dyn Fn(&str) -> Option<AttributeType>,
    max_attribute_name_chars: usize,
) -> Result<AttributeCondition, Error> {
    rules::check_attribute_name(
        || format!("{field}.attribute"),
        attribute,
        max_attribute_name_chars,
    )?;
    let op = op.ok_or_else(|| invalid(format!("{field}.op: must be set")))?;
    if matches!(op, Operator::Exists | Operator::NotExists) {
        return Ok(AttributeCondition {
            attribute: attribute.to_string(),
            op,
            values: Vec::new(),
        });
    }
    let inputs: Vec<&Value> = if op == Operator::In {
        if values.is_empty() {
            return Err(invalid(format!("{field}.values: IN needs at least one value")));
        }
        values.iter().collect()
    } else {
        vec![value.ok_or_else(|| invalid(format!("{field}.value: required for {op}")))?]
    };
    // An attribute not defined yet is compared by the comparison value's type.
    let ty = type_of(attribute).unwrap_or_else(|| natural_type(inputs[0]));
    let allowed = if op.is_ordering() {
        matches!(ty, AttributeType::Number | AttributeType::Date)
    } else if matches!(op, Operator::Contains | Operator::StartsWith) {
        ty == AttributeType::String
    } else {
        ty != AttributeType::Json
    };
    if !allowed {
        return Err(invalid(format!(
            "{field}.op: {op} cannot compare attribute {attribute:?} of type {ty}"
        )));
    }
    let values = inputs
        .into_iter()
        .map(|v| {
            typing::coerce(ty, v).map_err(|e| {
                invalid(format!(
                    "{field}.value: attribute {attribute:?} is {}, cannot coerce {}",
                    e.expected, e.shown
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(AttributeCondition {
        attribute: attribute.to_string(),
        op,
        values,
    })
}

/// The type a value has on its own: a number is NUMBER, a date DATE, and so on.
fn natural_type(v: &Value) -> AttributeType {
    match v {
        Value::String(_) => AttributeType::String,
        Value::Number(_) => AttributeType::Number,
        Value::Bool(_) => AttributeType::Boolean,
        Value::Date(_) => AttributeType::Date,
        Value::Json(_) => AttributeType::Json,
    }
}

impl AttributeCondition {
    /// Evaluates on one event. A missing attribute makes NE and NOT_EXISTS true and every other
    /// operator false; a stored value of another type than the comparison value never matches.
    pub(crate) fn matches(&self, event: &Event) -> bool {
        self.matches_value(event.attributes.get(&self.attribute))
    }

    /// Evaluates on a stored value (`None`: the event lacks the attribute).
    pub(crate) fn matches_value(&self, stored: Option<&Value>) -> bool {
        let Some(stored) = stored else {
            return matches!(self.op, Operator::Ne | Operator::NotExists);
        };
        // An attribute that was not defined when the condition was submitted may since have
        // been created with another type (events create it as STRING): compare the stored value
        // coerced to the comparison's type, as the comparison value was.
        let aligned;
        let actual = match self.values.first() {
            Some(v) if std::mem::discriminant(v) != std::mem::discriminant(stored) => {
                match typing::coerce(natural_type(v), stored) {
                    Ok(c) => {
                        aligned = c;
                        &aligned
                    }
                    Err(_) => stored,
                }
            }
            _ => stored,
        };
        match self.op {
            Operator::Exists => true,
            Operator::NotExists => false,
            Operator::In => self.values.iter().any(|v| v == actual),
            Operator::Eq => self.values.first().is_some_and(|v| v == actual),
            Operator::Ne => !self.values.first().is_some_and(|v| v == actual),
            Operator::Contains | Operator::StartsWith => match (actual, self.values.first()) {
                (Value::String(a), Some(Value::String(b))) => {
                    if self.op == Operator::Contains {
                        a.contains(b.as_str())
                    } else {
                        a.starts_with(b.as_str())
                    }
                }
                _ => false,
            },
            Operator::Gt | Operator::Gte | Operator::Lt | Operator::Lte => {
                let ordering = match (actual, self.values.first()) {
                    (Value::Number(a), Some(Value::Number(b))) => a.partial_cmp(b),
                    (Value::Date(a), Some(Value::Date(b))) => Some(a.cmp(b)),
                    _ => None,
                };
                ordering.is_some_and(|o| compare_ordering(self.op, o))
            }
        }
    }
}

fn compare_ordering(op: Operator, o: std::cmp::Ordering) -> bool {
    use std::cmp::Ordering::*;
    match op {
        Operator::Eq => o == Equal,
        Operator::Ne => o != Equal,
        Operator::Gt => o == Greater,
        Operator::Gte => o != Less,
        Operator::Lt => o == Less,
        Operator::Lte => o != Greater,
        _ => false,
    }
}

/// Evaluates a condition on one event: attribute conditions read the event, history conditions
/// are answered by `history` (which aggregates the user's events; see [`Accumulator`]).
pub(crate) fn eval(
    cond: &Condition,
    event: &Event,
    history: &mut dyn FnMut(&HistoryCondition) -> bool,
) -> bool {
    match cond {
        Condition::All(items) => items.iter().all(|c| eval(c, event, history)),
        Condition::Any(items) => items.iter().any(|c| eval(c, event, history)),
        Condition::Not(inner) => !eval(inner, event, history),
        Condition::Attribute(a) => a.matches(event),
        Condition::History(h) => history(h),
    }
}

/// Evaluates a `where` (attribute conditions combined with all/any/not) on an event whose
/// attributes `get` reads. History conditions cannot appear there (validation) and are false.
pub(crate) fn eval_where(cond: &Condition, get: &mut dyn FnMut(&str) -> Option<Value>) -> bool {
    match cond {
        Condition::All(items) => items.iter().all(|c| eval_where(c, get)),
        Condition::Any(items) => items.iter().any(|c| eval_where(c, get)),
        Condition::Not(inner) => !eval_where(inner, get),
        Condition::Attribute(a) => a.matches_value(get(&a.attribute).as_ref()),
        Condition::History(_) => false,
    }
}

/// Folds the matching events of a history condition into its aggregate.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Accumulator {
    pub count: u64,
    /// Events that carried a number for the aggregated attribute.
    pub numbers: u64,
    pub sum: f64,
    pub min: Option<f64>,
    pub max: Option<f64>,
}

impl Accumulator {
    /// The aggregate of everything a [`UserNameAggregate`] has seen, for `attribute`.
    pub(crate) fn from_aggregate(agg: &UserNameAggregate, attribute: &str) -> Self {
        Self::from_parts(agg.count, agg.numbers.get(attribute))
    }

    /// The aggregate of `count` events whose numbers for the attribute are `number`.
    pub(crate) fn from_parts(count: u64, number: Option<&NumberAggregate>) -> Self {
        let number = number.filter(|n| n.count > 0);
        Self {
            count,
            numbers: number.map_or(0, |n| n.count),
            sum: number.map_or(0.0, |n| n.sum),
            min: number.map(|n| n.min),
            max: number.map(|n| n.max),
        }
    }

    /// Adds one matching event, reading `attribute` when the aggregate needs it.
    pub(crate) fn add(&mut self, event: &Event, attribute: &str) {
        let number = match event.attributes.get(attribute) {
            Some(Value::Number(n)) => Some(*n),
            _ => None,
        };
        self.add_number(number);
    }

    /// Adds one matching event carrying `number` for the aggregated attribute (or none).
    pub(crate) fn add_number(&mut self, number: Option<f64>) {
        self.count += 1;
        if let Some(n) = number {
            self.numbers += 1;
            self.sum += n;
            self.min = Some(self.min.map_or(n, |m| m.min(n)));
            self.max = Some(self.max.map_or(n, |m| m.max(n)));
        }
    }

    /// Adds everything another accumulator holds.
    pub(crate) fn merge(&mut self, other: &Accumulator) {
        self.count += other.count;
        self.numbers += other.numbers;
        self.sum += other.sum;
        self.min = match (self.min, other.min) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.max = match (self.max, other.max) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }

    /// The aggregate's value; `None` when it has none (MIN/MAX/AVG over no numbers).
    pub(crate) fn value(&self, aggregate: Aggregate) -> Option<f64> {
        match aggregate {
            Aggregate::Count | Aggregate::DistinctUsers => Some(self.count as f64),
            Aggregate::Sum => Some(self.sum),
            Aggregate::Min => self.min,
            Aggregate::Max => self.max,
            Aggregate::Avg => (self.numbers > 0).then(|| self.sum / self.numbers as f64),
        }
    }
}

impl HistoryCondition {
    /// True when the aggregate compares with `op value`; an aggregate without a value (MIN, MAX,
    /// AVG over no events) makes the comparison false.
    pub(crate) fn holds(&self, acc: &Accumulator) -> bool {
        acc.value(self.aggregate)
            .and_then(|v| v.partial_cmp(&self.value))
            .is_some_and(|o| compare_ordering(self.op, o))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::model::Timestamp;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn types(name: &str) -> Option<AttributeType> {
        match name {
            "price" => Some(AttributeType::Number),
            "color" => Some(AttributeType::String),
            "when" => Some(AttributeType::Date),
            "doc" => Some(AttributeType::Json),
            _ => None,
        }
    }

    fn attr(attribute: &str, op: Operator, value: Value) -> RawCondition {
        RawCondition::Attribute {
            attribute: attribute.into(),
            op: Some(op),
            value: Some(value),
            values: vec![],
        }
    }

    fn check(raw: &RawCondition, place: Place) -> Result<Condition, Error> {
        validate(raw, "c", place, &types, 128)
    }

    fn event(attrs: &[(&str, Value)]) -> Event {
        Event {
            event_id: "e".into(),
            user_id: "u".into(),
            name: "n".into(),
            occurred_at: Timestamp::new(0, 0).unwrap(),
            received_at: Timestamp::new(0, 0).unwrap(),
            sequence: 1,
            attributes: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect::<BTreeMap<_, _>>(),
        }
    }

    #[test]
    fn comparison_values_are_coerced_to_the_attribute_type() {
        let c = check(
            &attr("price", Operator::Gt, Value::String("150".into())),
            Place::Trigger,
        )
        .unwrap();
        let blue_shoes = event(&[("price", Value::Number(151.0))]);
        assert!(eval(&c, &blue_shoes, &mut |_| false));
        assert!(!eval(&c, &event(&[("price", Value::Number(150.0))]), &mut |_| {
            false
        }));
    }

    #[test]
    fn conditions_that_can_never_be_valid_are_rejected_at_submission() {
        let cases = [
            attr("color", Operator::Gt, Value::String("a".into())),
            attr("price", Operator::Contains, Value::String("1".into())),
            attr("price", Operator::Eq, Value::String("abc".into())),
            attr("doc", Operator::Eq, Value::Json("1".into())),
            attr("fresh", Operator::Lt, Value::String("150".into())),
            RawCondition::Attribute {
                attribute: "color".into(),
                op: Some(Operator::In),
                value: None,
                values: vec![],
            },
            RawCondition::Attribute {
                attribute: "color".into(),
                op: None,
                value: Some(Value::String("x".into())),
                values: vec![],
            },
            RawCondition::Empty,
            RawCondition::Not(None),
        ];
        for raw in cases {
            let err = check(&raw, Place::Trigger).unwrap_err();
            assert!(
                matches!(err, Error::InvalidArgument(ref m) if m.starts_with("c")),
                "{raw:?}: {err:?}"
            );
        }
        // An undefined attribute compared with a number is a NUMBER comparison.
        assert!(check(&attr("fresh", Operator::Lt, Value::Number(3.0)), Place::Trigger).is_ok());
    }

    #[test]
    fn undefined_attributes_compare_by_the_comparison_type_even_after_auto_creation() {
        // `amount` was undefined at submission (NUMBER by its value); events then created it
        // as STRING, so the stored value is text.
        let c = check(
            &attr("amount", Operator::Gt, Value::Number(500.0)),
            Place::Trigger,
        )
        .unwrap();
        assert!(eval(
            &c,
            &event(&[("amount", Value::String("600".into()))]),
            &mut |_| false
        ));
        assert!(!eval(
            &c,
            &event(&[("amount", Value::String("400".into()))]),
            &mut |_| false
        ));
        assert!(!eval(
            &c,
            &event(&[("amount", Value::String("lots".into()))]),
            &mut |_| false
        ));
    }

    #[test]
    fn missing_attributes_make_only_ne_and_not_exists_true() {
        let e = event(&[]);
        for (op, want) in [
            (Operator::Eq, false),
            (Operator::Ne, true),
            (Operator::Gt, false),
            (Operator::Exists, false),
            (Operator::NotExists, true),
        ] {
            let c = check(&attr("price", op, Value::Number(1.0)), Place::Trigger).unwrap();
            assert_eq!(eval(&c, &e, &mut |_| false), want, "{op:?}");
        }
    }

    #[test]
    fn history_validation_and_placement() {
        let history = |aggregate, attribute: &str, op| RawCondition::History {
            event_name: "event.payment".into(),
            filter: Some(Box::new(attr("price", Operator::Gt, Value::Number(500.0)))),
            aggregate,
            attribute: attribute.into(),
            op: Some(op),
            value: 1.0,
            within_nanos: None,
        };
        let ok = check(&history(None, "", Operator::Gte), Place::Filter).unwrap();
        let Condition::History(h) = ok else { panic!() };
        assert_eq!(h.event_name, "payment");
        assert_eq!(h.aggregate, Aggregate::Count);
        assert!(check(
            &history(Some(Aggregate::Sum), "color", Operator::Gt),
            Place::Filter
        )
        .is_err());
        assert!(check(
            &history(Some(Aggregate::Sum), "price", Operator::Gt),
            Place::Filter
        )
        .is_ok());
        assert!(check(
            &history(Some(Aggregate::Avg), "not_yet", Operator::Gt),
            Place::Filter
        )
        .is_ok());
        assert!(check(
            &history(Some(Aggregate::DistinctUsers), "", Operator::Gt),
            Place::Filter
        )
        .is_err());
        assert!(check(&history(None, "", Operator::Contains), Place::Filter).is_err());
        assert!(check(&attr("price", Operator::Gt, Value::Number(1.0)), Place::Filter).is_err());
        let nested = RawCondition::All(vec![history(None, "", Operator::Gt)]);
        let in_where = RawCondition::History {
            event_name: "x".into(),
            filter: Some(Box::new(nested)),
            aggregate: None,
            attribute: String::new(),
            op: Some(Operator::Gt),
            value: 0.0,
            within_nanos: None,
        };
        let err = check(&in_where, Place::Trigger).unwrap_err();
        assert!(
            err.to_string()
                .contains("c.history.where.all.conditions[0].history"),
            "{err}"
        );
    }

    #[test]
    fn empty_history_counts_zero_and_has_no_min() {
        let acc = Accumulator::default();
        let h = |aggregate, op, value| HistoryCondition {
            event_name: "e".into(),
            filter: None,
            aggregate,
            attribute: "price".into(),
            op,
            value,
            within_nanos: None,
        };
        assert!(h(Aggregate::Count, Operator::Eq, 0.0).holds(&acc));
        assert!(h(Aggregate::Sum, Operator::Lte, 0.0).holds(&acc));
        assert!(!h(Aggregate::Min, Operator::Lt, 1e300).holds(&acc));
        assert!(!h(Aggregate::Avg, Operator::Ne, 5.0).holds(&acc));
    }

    proptest! {
        #[test]
        fn accumulator_matches_a_plain_fold(prices in proptest::collection::vec(-1e6f64..1e6, 0..50)) {
            let mut acc = Accumulator::default();
            for p in &prices {
                acc.add(&event(&[("price", Value::Number(*p))]), "price");
            }
            prop_assert_eq!(acc.value(Aggregate::Count), Some(prices.len() as f64));
            prop_assert_eq!(acc.value(Aggregate::Min), prices.iter().cloned().reduce(f64::min));
            prop_assert_eq!(acc.value(Aggregate::Max), prices.iter().cloned().reduce(f64::max));
            let sum: f64 = prices.iter().sum();
            prop_assert!((acc.value(Aggregate::Sum).unwrap() - sum).abs() < 1e-6);
        }

        #[test]
        fn ordering_operators_agree_with_f64(a in -1e6f64..1e6, b in -1e6f64..1e6) {
            let e = event(&[("price", Value::Number(a))]);
            for (op, want) in [
                (Operator::Gt, a > b), (Operator::Gte, a >= b), (Operator::Lt, a < b),
                (Operator::Lte, a <= b), (Operator::Eq, a == b), (Operator::Ne, a != b),
            ] {
                let c = check(&attr("price", op, Value::Number(b)), Place::Trigger).unwrap();
                prop_assert_eq!(eval(&c, &e, &mut |_| false), want);
            }
        }
    }
}
