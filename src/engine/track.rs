//! Tracking events and defining attributes: typing, sequencing, idempotency by event id, and
//! everything an event adds to its group (timeline, index, name statistics, aggregates), then
//! the triggers it matches and the timers it arms or cancels.

use std::collections::BTreeMap;

use super::{Group, Writer};
use crate::domain::model::{
    approx_event_size, AttributeDefinition, AttributeType, Event, EventNameStats, Timestamp, Value,
};
use crate::domain::rules::{self, PreparedEvent};
use crate::domain::typing;
use crate::error::{invalid, Error};
use crate::store::timers::user_bucket;

/// What happened to one tracked event.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Tracked {
    pub(crate) event_id: String,
    pub(crate) sequence: u64,
    pub(crate) duplicate: bool,
    pub(crate) actions_fired: u32,
}

/// The outcome of DefineAttribute.
pub(crate) type Defined = Result<AttributeDefinition, Error>;

impl Writer {
    pub(super) fn define(
        &mut self,
        name: String,
        attribute_type: AttributeType,
        description: String,
        group: &mut Group,
    ) -> Defined {
        if let Some(existing) = self.definition(&name, group) {
            if existing.attribute_type == attribute_type {
                return Ok(existing);
            }
            return Err(Error::FailedPrecondition(format!(
                "type: attribute {name:?} is already defined as {}, cannot redefine it as {attribute_type}",
                existing.attribute_type
            )));
        }
        let def = AttributeDefinition {
            name,
            attribute_type,
            description,
            auto_created: false,
            created_at: Timestamp::now(),
        };
        group.batch.put_attribute(&def);
        group.new_attributes.push(def.clone());
        Ok(def)
    }

    pub(super) fn track_one(&mut self, event: PreparedEvent, group: &mut Group) -> Result<Tracked, Error> {
        group.reads.start_event();
        if let Some(id) = &event.event_id {
            let known = match group.event_ids.get(id) {
                Some(seq) => Some(*seq),
                None => self.store.sequence_of_event_id(id)?,
            };
            if let Some(sequence) = known {
                return Ok(Tracked {
                    event_id: id.clone(),
                    sequence,
                    duplicate: true,
                    actions_fired: 0,
                });
            }
        }
        // Type every attribute before writing anything: a rejected event leaves nothing behind.
        let now = Timestamp::now();
        let (attributes, created) = self.type_attributes(event.attributes, group, now)?;
        // Typing can grow a value (JSON is re-serialised: 1e15 becomes 1000000000000000.0):
        // stored, the event must still fit one answer.
        let event_id = event.event_id.as_deref().unwrap_or("");
        let typed_bytes = approx_event_size(event_id, &event.user_id, &event.name, &attributes);
        let max = self.limits.max_item_bytes();
        if typed_bytes > max {
            return Err(invalid(format!(
                ": {typed_bytes} bytes once typed, at most {max} allowed (max_message_bytes less room for the answer)"
            )));
        }
        let event_id = match &event.event_id {
            Some(id) => id.clone(),
            None => self.generate_id(),
        };
        let stored = Event {
            event_id,
            user_id: event.user_id,
            name: event.name,
            occurred_at: event.occurred_at.unwrap_or(now),
            received_at: now,
            sequence: self.last_seq + 1,
            attributes,
        };
        // Reads that may fail come before any change to the group.
        let aggregate = match self.maintained.get(&stored.name) {
            Some(epoch) => {
                let (mut agg, _) = self.aggregate(&stored.user_id, &stored.name, *epoch, group)?;
                agg.add(&stored);
                Some(agg)
            }
            None => None,
        };
        let firing = self.matching_triggers(&stored, aggregate.as_ref(), group)?;
        let cancels = self.cancellations(&stored, group)?;
        let plan = self.plan_timers(&stored, firing, group)?;
        if !cancels.is_empty() || !plan.removals.is_empty() || !plan.arms.is_empty() {
            group.timers.load(&self.store, user_bucket(&stored.user_id))?;
        }

        self.last_seq += 1;
        if let Some(id) = event.event_id {
            group.batch.put_event_id(&id, stored.sequence);
            group.event_ids.insert(id, stored.sequence);
        }
        for def in created {
            group.batch.put_attribute(&def);
            group.new_attributes.push(def);
        }
        group.batch.put_event(&stored);
        group.columns.add(&stored);
        self.count_name(&stored, group);
        // (user, name) keys are built only when something is kept per pair: most events of a
        // batch need neither.
        if let Some(agg) = aggregate {
            group
                .aggregates
                .insert((stored.user_id.clone(), stored.name.clone()), agg);
        }
        if self.history_triggers > 0 {
            group
                .recent
                .entry((stored.user_id.clone(), stored.name.clone()))
                .or_default()
                .push(stored.clone());
        }
        let now_firing = self.settle_timers(&stored, cancels, plan, group, now);
        let actions_fired = self.fire(&stored, now_firing, group, now);
        Ok(Tracked {
            event_id: stored.event_id,
            sequence: stored.sequence,
            duplicate: false,
            actions_fired,
        })
    }

    /// Types an event's attributes as this group sees the schema: defined ones are coerced to
    /// their type, undefined ones get the type their value gives them (answered as definitions
    /// to create with the event).
    fn type_attributes(
        &self,
        attributes: Vec<(String, Value)>,
        group: &Group,
        now: Timestamp,
    ) -> Result<(BTreeMap<String, Value>, Vec<AttributeDefinition>), Error> {
        let mut typed = BTreeMap::new();
        let mut created = Vec::new();
        for (name, value) in attributes {
            let (ty, auto) = match self.attribute_type(&name, group) {
                Some(ty) => (ty, false),
                None => (typing::type_for_undefined(&value), true),
            };
            let value = rules::typed_value(&self.limits, &name, ty, &value)?;
            if auto {
                created.push(AttributeDefinition {
                    name: name.clone(),
                    attribute_type: ty,
                    description: String::new(),
                    auto_created: true,
                    created_at: now,
                });
            }
            typed.insert(name, value);
        }
        Ok((typed, created))
    }

    /// Counts an event in its name's statistics.
    pub(super) fn count_name(&self, event: &Event, group: &mut Group) {
        // Hot path: most events of a group share a name already counted in it.
        if let Some(stats) = group.name_stats.get_mut(&event.name) {
            stats.record(event.occurred_at);
            return;
        }
        let stats = match self.event_names.get(&event.name) {
            Some(s) => {
                let mut s = s.clone();
                s.record(event.occurred_at);
                s
            }
            None => EventNameStats::first(event.occurred_at),
        };
        group.name_stats.insert(event.name.clone(), stats);
    }
}
