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
    // range() yields at most MAX_RANGE items: loops cannot multiply what a template writes.
    env.add_function("range", bounded_range);
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

/// Most items `range()` yields in a template.
const MAX_RANGE: i64 = 1000;

fn bounded_range(lower: i64, upper: Option<i64>, step: Option<i64>) -> Result<J, minijinja::Error> {
    let (lower, upper) = match upper {
        Some(upper) => (lower, upper),
        None => (0, lower),
    };
    let step = step.unwrap_or(1);
    if step == 0 {
        return Err(minijinja::Error::new(
            minijinja::ErrorKind::InvalidOperation,
            "range step of 0",
        ));
    }
    let items: Vec<i64> = if step > 0 {
        (lower..upper)
            .step_by(step as usize)
            .take(MAX_RANGE as usize)
            .collect()
    } else {
        let mut v = Vec::new();
        let mut i = lower;
        while i > upper && (v.len() as i64) < MAX_RANGE {
            v.push(i);
            i += step;
        }
        v
    };
    Ok(J::from(items))
}

/// Constructs a payload template may not use, because they can build text far larger than
/// anything the template writes out (which the output limit bounds): string repetition and
/// concatenation operators, blocks that capture output into a value, and filters that multiply
/// their input.
const FORBIDDEN_TAGS: &[&str] = &["macro", "call", "filter", "include", "import", "extends", "block"];
const FORBIDDEN_NAMES: &[&str] = &[
    "join",
    "format",
    "replace",
    "indent",
    "center",
    "split",
    "lines",
    "list",
    "batch",
    "slice",
    "chain",
    "zip",
    "wordwrap",
    "namespace",
    "pprint",
    "map",
];

/// The first construct of `source` a payload template may not use, described.
fn forbidden_construct(source: &str) -> Option<String> {
    let mut rest = source;
    while let Some(at) = rest.find('{') {
        let tail = &rest[at..];
        let (close, is_tag) = if tail.starts_with("{{") {
            ("}}", false)
        } else if tail.starts_with("{%") {
            ("%}", true)
        } else if tail.starts_with("{#") {
            match tail.find("#}") {
                Some(end) => {
                    rest = &tail[end + 2..];
                    continue;
                }
                None => return None,
            }
        } else {
            rest = &tail[1..];
            continue;
        };
        // The code of the block, its string literals blanked out.
        let mut code = String::new();
        let mut quote: Option<char> = None;
        let mut escaped = false;
        let mut end = None;
        let body = &tail[2..];
        for (i, c) in body.char_indices() {
            match quote {
                Some(q) => {
                    if escaped {
                        escaped = false;
                    } else if c == '\\' {
                        escaped = true;
                    } else if c == q {
                        quote = None;
                    }
                    code.push(' ');
                }
                None if c == '\'' || c == '"' => {
                    quote = Some(c);
                    code.push(' ');
                }
                None if body[i..].starts_with(close) => {
                    end = Some(i);
                    break;
                }
                None => code.push(c),
            }
        }
        let end = end?;
        let code = code.trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        if let Some(op) = code.chars().find(|c| matches!(c, '*' | '~' | '+' | '%')) {
            return Some(format!(
                "the operator {op:?} is not allowed in payload templates (it can build unbounded text)"
            ));
        }
        let words: Vec<&str> = code
            .split(|c: char| !(c.is_alphanumeric() || c == '_'))
            .filter(|w| !w.is_empty())
            .collect();
        if is_tag {
            let first = words.first().copied().unwrap_or("");
            if FORBIDDEN_TAGS.contains(&first) {
                return Some(format!("{{% {first} %}} is not allowed in payload templates"));
            }
            if first == "set" && !code.contains('=') {
                return Some(
                    "a {% set %} block is not allowed in payload templates (it captures output)".into(),
                );
            }
        }
        if let Some(name) = words.iter().find(|w| FORBIDDEN_NAMES.contains(w)) {
            return Some(format!(
                "{name} is not allowed in payload templates (it can build unbounded text)"
            ));
        }
        rest = &body[end + close.len()..];
    }
    None
}

/// Checks that `source` parses and uses only what payload templates allow; the error text says
/// where and why not.
pub(crate) fn check(source: &str) -> Result<(), String> {
    let env = environment();
    env.template_from_str(source).map_err(|e| {
        let mut msg = e.to_string();
        if let Some(line) = e.line() {
            msg = format!("line {line}: {msg}");
        }
        format!("does not parse: {msg}")
    })?;
    match forbidden_construct(source) {
        Some(why) => Err(why),
        None => Ok(()),
    }
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

/// The variables of a payload template that come from the event: built once per event, for
/// every trigger firing on it (values are shared, not copied, per render).
pub(crate) struct EventContext {
    user_id: J,
    event: J,
}

impl EventContext {
    pub(crate) fn new(event: &Event) -> Self {
        let attributes: BTreeMap<&str, J> = event
            .attributes
            .iter()
            .map(|(k, v)| (k.as_str(), attribute(v)))
            .collect();
        Self {
            user_id: J::from(event.user_id.as_str()),
            event: minijinja::context! {
                name => event.name.as_str(),
                event_id => event.event_id.as_str(),
                occurred_at => event.occurred_at.to_string(),
                attributes => attributes,
            },
        }
    }

    /// The variables a payload template sees.
    fn with_trigger(&self, trigger_id: &str, trigger_name: &str) -> J {
        minijinja::context! {
            user_id => self.user_id.clone(),
            event => self.event.clone(),
            trigger => minijinja::context! { id => trigger_id, name => trigger_name },
        }
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
    /// failure here means stored data no longer parses, or was stored before a construct it uses
    /// was forbidden: the trigger then renders empty (logged at start) until it is updated.
    pub(crate) fn set(&mut self, trigger_id: &str, source: &str) {
        if let Some(why) = forbidden_construct(source) {
            tracing::error!(trigger_id, reason = %why, "stored payload template is no longer allowed; the trigger renders empty until it is updated");
            self.env.remove_template(trigger_id);
            return;
        }
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

    /// Renders a trigger's payload for an event (its [`EventContext`]) into at most `limit`
    /// bytes; never fails (see the module documentation).
    pub(crate) fn render(
        &self,
        trigger_id: &str,
        trigger_name: &str,
        event: &EventContext,
        limit: usize,
    ) -> String {
        match self.env.get_template(trigger_id) {
            Ok(t) => render_bounded(
                &t,
                event.with_trigger(trigger_id, trigger_name),
                limit,
                trigger_id,
            ),
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
        environment().render_str(
            source,
            EventContext::new(event).with_trigger(trigger_id, trigger_name),
        ),
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
            render(
                "{% for i in range(1000) %}{% for j in range(1000) %}x{% endfor %}{% endfor %}",
                &event(),
                "t",
                "n"
            ),
            ""
        );
    }

    #[test]
    fn compiled_templates_render_like_one_off_ones() {
        let mut t = Templates::default();
        let source = "{{ trigger.name }}: {{ event.attributes.price }} for {{ user_id }}";
        t.set("t1", source);
        assert_eq!(
            t.render("t1", "n", &EventContext::new(&event()), 1 << 20),
            render(source, &event(), "t1", "n")
        );
        t.remove("t1");
        assert_eq!(t.render("t1", "n", &EventContext::new(&event()), 1 << 20), "");
    }

    #[test]
    fn output_past_the_limit_renders_empty_and_debug_is_not_available() {
        let mut t = Templates::default();
        t.set(
            "big",
            "{% for i in range(1000) %}{{ event.attributes.name }}{% endfor %}",
        );
        assert_eq!(t.render("big", "n", &EventContext::new(&event()), 100), "");
        assert_eq!(
            t.render("big", "n", &EventContext::new(&event()), 1 << 20).len(),
            10_000
        );
        t.set("dbg", "[{{ debug() }}]");
        assert_eq!(t.render("dbg", "n", &EventContext::new(&event()), 1 << 20), "");
    }

    #[test]
    fn a_stored_template_with_a_construct_now_forbidden_renders_empty() {
        let mut t = Templates::default();
        // Small enough to render if it were compiled: only the check makes it empty.
        assert_eq!(
            render("{{ user_id ~ '!' }}", &event(), "old", "n"),
            format!("{}!", event().user_id)
        );
        t.set("old", "{{ user_id ~ '!' }}");
        t.set("ok", "{{ user_id }}");
        assert_eq!(t.render("old", "n", &EventContext::new(&event()), 1 << 20), "");
        assert_eq!(
            t.render("ok", "n", &EventContext::new(&event()), 1 << 20),
            event().user_id
        );
    }

    #[test]
    fn constructs_that_can_build_unbounded_text_are_refused() {
        for bad in [
            "{{ \"x\" * 100000000 }}",
            "{{ event.attributes.name ~ event.attributes.name }}",
            "{{ user_id + user_id }}",
            "{{ \"%s%s\" % (user_id, user_id) }}",
            "{% set big %}{% for i in range(1000) %}{{ event.attributes.name }}{% endfor %}{% endset %}{{ big }}",
            "{% macro m() %}x{% endmacro %}{{ m() }}",
            "{{ range(1000)|join(event.attributes.name) }}",
            "{{ event.attributes.name|replace(\"e\", event.attributes.name) }}",
            "{{ event.attributes|tojson(indent=100000000) }}",
            "{{ [user_id]|map(\"join\") }}",
        ] {
            assert!(check(bad).is_err(), "{bad}");
        }
        for good in [
            "Hi {{ user_id | upper }}, thanks for your {{ event.attributes.price }} purchase",
            "{\"to\": \"{{ user_id }}\", \"subject\": \"a * b ~ c + d % e\"}",
            "{% if event.attributes.price > 30 %}big{% else %}small{% endif %}{# a * comment #}",
            "{% set n = event.attributes.price %}{{- n -}}",
            "{{ event.attributes | tojson }} {{ event.name | default(\"none\") }}",
            "{% for i in range(3) %}{{ i }}{% endfor %}",
        ] {
            assert!(check(good).is_ok(), "{good}: {:?}", check(good));
        }
        let mut t = Templates::default();
        t.set("r", "{% for i in range(100000) %}x{% endfor %}");
        assert_eq!(
            t.render("r", "n", &EventContext::new(&event()), 1 << 20).len(),
            1000,
            "range() yields 1000 at most"
        );
    }

    #[test]
    fn bad_templates_are_rejected_with_a_location() {
        assert!(check("{{ user_id ").is_err());
        assert!(check("{% if %}").unwrap_err().contains("line 1"));
        assert!(check("Hello {{ user_id | upper }}").is_ok());
    }
}
