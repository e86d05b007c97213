//! Attribute typing: coercion of incoming values to their defined type, the type an undefined
//! attribute is created with, and the canonical text of values.

use crate::domain::model::{AttributeType, Timestamp, Value};

/// Why a value cannot be coerced; the caller adds the attribute's name.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CoerceError {
    pub expected: AttributeType,
    /// The offending value as the client sent it, quoted and shortened for messages.
    pub shown: String,
}

/// Coerces `value` to `ty`, returning the value as stored.
pub(crate) fn coerce(ty: AttributeType, value: &Value) -> Result<Value, CoerceError> {
    let fail = || CoerceError {
        expected: ty,
        shown: show(value),
    };
    match (ty, value) {
        (AttributeType::String, v) => Ok(Value::String(canonical_text(v).ok_or_else(fail)?)),
        (AttributeType::Number, Value::Number(n)) if n.is_finite() => Ok(Value::Number(*n)),
        (AttributeType::Number, Value::String(s)) => parse_number(s).map(Value::Number).ok_or_else(fail),
        (AttributeType::Boolean, Value::Bool(b)) => Ok(Value::Bool(*b)),
        (AttributeType::Boolean, Value::String(s)) => match s.trim().to_ascii_lowercase().as_str() {
            "true" => Ok(Value::Bool(true)),
            "false" => Ok(Value::Bool(false)),
            _ => Err(fail()),
        },
        (AttributeType::Date, Value::Date(ts)) => Ok(Value::Date(*ts)),
        (AttributeType::Date, Value::String(s)) => Timestamp::parse(s).map(Value::Date).ok_or_else(fail),
        (AttributeType::Json, Value::Json(s) | Value::String(s)) => {
            compact_json(s).map(Value::Json).ok_or_else(fail)
        }
        _ => Err(fail()),
    }
}

/// The type an undefined attribute is created with: JSON for a `json_value`, STRING otherwise.
pub(crate) fn type_for_undefined(value: &Value) -> AttributeType {
    match value {
        Value::Json(_) => AttributeType::Json,
        _ => AttributeType::String,
    }
}

/// A finite decimal number (sign, fraction and exponent allowed, surrounding spaces ignored).
pub(crate) fn parse_number(text: &str) -> Option<f64> {
    let t = text.trim();
    // Rust also parses "inf", "NaN" and "infinity": only digits and number punctuation pass.
    if t.is_empty()
        || !t.bytes().any(|b| b.is_ascii_digit())
        || !t
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'+' | b'-' | b'.' | b'e' | b'E'))
    {
        return None;
    }
    t.parse::<f64>().ok().filter(|n| n.is_finite())
}

/// The canonical text of a number: `39`, `39.5`, `-0.001` (shortest round-trip, no exponent).
pub(crate) fn number_text(n: f64) -> String {
    if n == 0.0 {
        return "0".to_string();
    }
    format!("{n}")
}

/// The canonical text of a scalar: how a STRING attribute stores it and how
/// templates render it. `None` for a non-finite number or invalid JSON.
pub(crate) fn canonical_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) if n.is_finite() => Some(number_text(*n)),
        Value::Number(_) => None,
        Value::Bool(b) => Some(b.to_string()),
        Value::Date(ts) => Some(ts.to_string()),
        Value::Json(s) => compact_json(s),
    }
}

/// Valid JSON re-serialised compactly (key order kept), or `None` when `text` is not JSON.
pub(crate) fn compact_json(text: &str) -> Option<String> {
    let parsed: serde_json::Value = serde_json::from_str(text).ok()?;
    serde_json::to_string(&parsed).ok()
}

/// A value as messages show it: strings quoted, long ones cut at 64 characters.
pub(crate) fn show(value: &Value) -> String {
    let (text, quoted) = match value {
        Value::String(s) => (s.clone(), true),
        Value::Json(s) => (s.clone(), true),
        Value::Number(n) => (format!("{n}"), false),
        Value::Bool(b) => (b.to_string(), false),
        Value::Date(ts) => (ts.to_string(), false),
    };
    let cut: String = text.chars().take(64).collect();
    let cut = if cut.len() < text.len() {
        format!("{cut}…")
    } else {
        cut
    };
    if quoted {
        format!("{cut:?}")
    } else {
        cut
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn number_accepts_decimal_text_and_rejects_the_rest() {
        for (text, want) in [("39", 39.0), (" 39.5 ", 39.5), ("-1e3", -1000.0), ("+.5", 0.5)] {
            assert_eq!(
                coerce(AttributeType::Number, &Value::String(text.into())),
                Ok(Value::Number(want))
            );
        }
        for bad in ["", "abc", "NaN", "inf", "infinity", "1e400", "0x10", "1,5", "--1"] {
            assert!(
                coerce(AttributeType::Number, &Value::String(bad.into())).is_err(),
                "{bad}"
            );
        }
        assert!(coerce(AttributeType::Number, &Value::Number(f64::NAN)).is_err());
        assert!(coerce(AttributeType::Number, &Value::Bool(true)).is_err());
    }

    #[test]
    fn string_stores_canonical_text_of_any_scalar() {
        let s = |v: Value| coerce(AttributeType::String, &v).unwrap();
        assert_eq!(s(Value::Number(39.0)), Value::String("39".into()));
        assert_eq!(s(Value::Number(39.5)), Value::String("39.5".into()));
        assert_eq!(s(Value::Bool(true)), Value::String("true".into()));
        assert_eq!(
            s(Value::Date(Timestamp::new(0, 0).unwrap())),
            Value::String("1970-01-01T00:00:00Z".into())
        );
        assert_eq!(
            s(Value::Json("{ \"b\": 1, \"a\": [1, 2] }".into())),
            Value::String("{\"b\":1,\"a\":[1,2]}".into())
        );
    }

    #[test]
    fn boolean_and_date_coercion() {
        assert_eq!(
            coerce(AttributeType::Boolean, &Value::String("TRUE".into())),
            Ok(Value::Bool(true))
        );
        assert!(coerce(AttributeType::Boolean, &Value::String("yes".into())).is_err());
        assert_eq!(
            coerce(AttributeType::Date, &Value::String("2026-01-31".into())),
            Ok(Value::Date(Timestamp::new(1_769_817_600, 0).unwrap()))
        );
        assert_eq!(
            coerce(
                AttributeType::Date,
                &Value::String("2026-01-31T01:00:00+01:00".into())
            ),
            Ok(Value::Date(Timestamp::new(1_769_817_600, 0).unwrap()))
        );
        assert!(coerce(AttributeType::Date, &Value::String("31/01/2026".into())).is_err());
        for out_of_range in [
            "2026-01-31T00:00:00+25:00",
            "2026-01-31T00:00:00-24:00",
            "2026-01-31T00:00:00+2500",
            "2026-12-31T23:59:60Z",
        ] {
            assert!(
                coerce(AttributeType::Date, &Value::String(out_of_range.into())).is_err(),
                "{out_of_range}"
            );
        }
        assert!(coerce(
            AttributeType::Date,
            &Value::String("2026-01-31T00:00:00+23:59".into())
        )
        .is_ok());
        assert!(coerce(
            AttributeType::Date,
            &Value::String("2026-01-31T00:00:59.5-05:00".into())
        )
        .is_ok());
        assert!(coerce(AttributeType::Json, &Value::String("{oops".into())).is_err());
    }

    proptest! {
        #[test]
        fn finite_numbers_round_trip_through_their_text(n in proptest::num::f64::NORMAL | proptest::num::f64::ZERO) {
            let text = number_text(n);
            prop_assert_eq!(parse_number(&text), Some(if n == 0.0 { 0.0 } else { n }));
            prop_assert_eq!(
                coerce(AttributeType::Number, &Value::String(text.clone())),
                Ok(Value::Number(if n == 0.0 { 0.0 } else { n }))
            );
        }

        #[test]
        fn integers_render_without_a_fraction(i in -1_000_000_000i64..1_000_000_000) {
            prop_assert_eq!(number_text(i as f64), i.to_string());
        }

        #[test]
        fn string_coercion_never_fails_on_finite_scalars(s in ".*", n in proptest::num::f64::NORMAL, b: bool) {
            prop_assert!(coerce(AttributeType::String, &Value::String(s)).is_ok());
            prop_assert!(coerce(AttributeType::String, &Value::Number(n)).is_ok());
            prop_assert!(coerce(AttributeType::String, &Value::Bool(b)).is_ok());
        }
    }
}
