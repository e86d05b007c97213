//! Action payload templates (minijinja, Jinja2 syntax): checked when a trigger is submitted,
//! rendered when it fires. Rendering never fails: a missing value renders empty, and a template
//! that runs out of fuel, writes more than its output limit or hits a runtime error renders as
//! empty text (logged). Work is bounded by fuel and memory by the output limit: a loop that
//! repeats a large attribute stops at the limit instead of filling memory. `debug()`, which would
//! print the engine's template state, is not available.

use std::collections::BTreeMap;

use minijinja::{Environment, UndefinedBehavior, Value as J};

use crate::domain::model::{Event, Value};
use crate::domain::typing;

/// Bounded work per render: minijinja's fuel counts executed instructions.
const FUEL: u64 = 50_000;

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_fuel(Some(FUEL));
    env.remove_global("debug");
    // A missing value (even a chain such as event.attributes.missing.x) renders empty.
    env.set_undefined_behavior(UndefinedBehavior::Chainable);
    // Booleans print as their canonical text (`true`), not Python's `True`.
    env.set_formatter(|out, state, value| {
        if value.kind() == minijinja::value::ValueKind::Bool {
            out.write_str(if value.is_true() { "true" } else { "false" })
                .map_err(|e| minijinja::Error::new(minijinja::ErrorKind::WriteFailure, e.to_string()))
        } else {
            minijinja::escape_formatter(out, state, value)
        }
    });
    env
}

/// Checks that `source` parses; the error text says where it does not.
pub(crate) fn check(source: &str) -> Result<(), String> {
    let env = environment();
    env.template_from_str(source).map(|_| ()).map_err(|e| {
        let mut msg = e.to_string();
        if let Some(line) = e.line() {
            msg = format!("line {line}: {msg}");
        }
        msg
    })
}

/// An attribute as templates see it: numbers stay numbers (so comparisons work) but render as
/// their canonical text (`39`, not `39.0`); everything else is its canonical text.
fn attribute(v: &Value) -> J {
    match v {
        Value::Number(n) if n.fract() == 0.0 && n.abs() < 9.0e15 => J::from(*n as i64),
        Value::Number(n) => J::from(*n),
        Value::Bool(b) => J::from(*b),
        other => J::from(typing::canonical_text(other).unwrap_or_default()),
    }
}

/// The variables a payload template sees.
fn context(event: &Event, trigger_id: &str, trigger_name: &str) -> J {
    let attributes: BTreeMap<&str, J> = event
        .attributes
        .iter()
        .map(|(k, v)| (k.as_str(), attribute(v)))
        .collect();
    minijinja::context! {
        user_id => event.user_id.as_str(),
        event => minijinja::context! {
            name => event.name.as_str(),
            event_id => event.event_id.as_str(),
            occurred_at => event.occurred_at.to_string(),
            attributes => attributes,
        },
        trigger => minijinja::context! { id => trigger_id, name => trigger_name },
    }
}

/// An output that refuses to grow past `limit` bytes.
struct Bounded {
    out: Vec<u8>,
    limit: usize,
}

impl std::io::Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.out.len() + buf.len() > self.limit {
            return Err(std::io::Error::other(format!(
                "the payload is larger than its limit of {} bytes",
                self.limit
            )));
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Renders `template` with `ctx` into at most `limit` bytes; empty (logged) on any failure.
fn render_bounded(template: &minijinja::Template<'_, '_>, ctx: J, limit: usize, trigger_id: &str) -> String {
    let mut out = Bounded {
        out: Vec::new(),
        limit,
    };
    let result = template
        .render_captured_to(ctx, &mut out)
        .map(|_| String::from_utf8(out.out).unwrap_or_default());
    rendered(result, trigger_id)
}

fn rendered(result: Result<String, minijinja::Error>, trigger_id: &str) -> String {
    result.unwrap_or_else(|e| {
        tracing::warn!(trigger_id, error = %e, "payload template failed at fire time; rendering empty");
        String::new()
    })
}

/// The compiled payload templates of every trigger, by trigger id: parsed once when a trigger is
/// stored, not on every firing.
pub(crate) struct Templates {
    env: Environment<'static>,
}

impl Default for Templates {
    fn default() -> Self {
        Self { env: environment() }
    }
}

impl Templates {
    /// Compiles (or replaces) a trigger's template. Templates are checked at submission, so a
    /// failure here means stored data no longer parses: the trigger then renders empty.
    pub(crate) fn set(&mut self, trigger_id: &str, source: &str) {
        if let Err(e) = self
            .env
            .add_template_owned(trigger_id.to_string(), source.to_string())
        {
            tracing::error!(trigger_id, error = %e, "stored payload template does not parse");
            self.env.remove_template(trigger_id);
        }
    }

    /// Forgets a trigger's template.
    pub(crate) fn remove(&mut self, trigger_id: &str) {
        self.env.remove_template(trigger_id);
    }

    /// Renders a trigger's payload for `event` into at most `limit` bytes; never fails (see
    /// the module documentation).
    pub(crate) fn render(&self, trigger_id: &str, trigger_name: &str, event: &Event, limit: usize) -> String {
        match self.env.get_template(trigger_id) {
            Ok(t) => render_bounded(&t, context(event, trigger_id, trigger_name), limit, trigger_id),
            Err(_) => String::new(),
        }
    }
}

/// Renders `source` once (compiling it on the spot) for `event` fired by a trigger; the tests'
/// reference for [`Templates::render`].
#[cfg(test)]
pub(crate) fn render(source: &str, event: &Event, trigger_id: &str, trigger_name: &str) -> String {
    if source.is_empty() {
        return String::new();
    }
    rendered(
        environment().render_str(source, context(event, trigger_id, trigger_name)),
        trigger_id,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::model::Timestamp;

    fn event() -> Event {
        let mut attributes = BTreeMap::new();
        attributes.insert("price".to_string(), Value::Number(39.0));
        attributes.insert("ratio".to_string(), Value::Number(39.5));
        attributes.insert("name".to_string(), Value::String("Blue shoes".into()));
        attributes.insert("express".to_string(), Value::Bool(true));
        attributes.insert("cart".to_string(), Value::Json("{\"items\":2}".into()));
        Event {
            event_id: "e1".into(),
            user_id: "u1".into(),
            name: "product_purchased".into(),
            occurred_at: Timestamp::new(0, 0).unwrap(),
            received_at: Timestamp::new(0, 0).unwrap(),
            sequence: 1,
            attributes,
        }
    }

    #[test]
    fn renders_typed_attributes_as_canonical_text() {
        let out = render(
            "{{ user_id }} {{ event.name }} {{ event.attributes.price }} {{ event.attributes.ratio }} \
             {{ event.attributes.express }} {{ event.attributes.cart }} {{ trigger.id }}/{{ trigger.name }} \
             {{ event.occurred_at }}{% if event.attributes.price > 30 %} big{% endif %}",
            &event(),
            "t1",
            "Big buy",
        );
        assert_eq!(
            out,
            "u1 product_purchased 39 39.5 true {\"items\":2} t1/Big buy 1970-01-01T00:00:00Z big"
        );
    }

    #[test]
    fn missing_values_render_empty_and_never_fail() {
        assert_eq!(
            render(
                "[{{ event.attributes.nope }}][{{ nope.deeper.still }}]",
                &event(),
                "t",
                "n"
            ),
            "[][]"
        );
        // Runs out of fuel: renders empty instead of failing.
        assert_eq!(
            render("{% for i in range(100000) %}x{% endfor %}", &event(), "t", "n"),
            ""
        );
    }

    #[test]
    fn compiled_templates_render_like_one_off_ones() {
        let mut t = Templates::default();
        let source = "{{ trigger.name }}: {{ event.attributes.price }} for {{ user_id }}";
        t.set("t1", source);
        assert_eq!(
            t.render("t1", "n", &event(), 1 << 20),
            render(source, &event(), "t1", "n")
        );
        t.remove("t1");
        assert_eq!(t.render("t1", "n", &event(), 1 << 20), "");
    }

    #[test]
    fn output_past_the_limit_renders_empty_and_debug_is_not_available() {
        let mut t = Templates::default();
        t.set(
            "big",
            "{% for i in range(1000) %}{{ event.attributes.name }}{% endfor %}",
        );
        assert_eq!(t.render("big", "n", &event(), 100), "");
        assert_eq!(t.render("big", "n", &event(), 1 << 20).len(), 10_000);
        t.set("dbg", "[{{ debug() }}]");
        assert_eq!(t.render("dbg", "n", &event(), 1 << 20), "");
    }

    #[test]
    fn bad_templates_are_rejected_with_a_location() {
        assert!(check("{{ user_id ").is_err());
        assert!(check("{% if %}").unwrap_err().contains("line 1"));
        assert!(check("Hello {{ user_id | upper }}").is_ok());
    }
}
