//! Topic templates: `plant/{site}/{device}/temp`, filled from the match
//! pattern's captures, and `fleet/{payload.serial}`, filled from a field of
//! the (transformed) payload.

use serde_json::Value;

/// A compiled template: literal text, capture references and payload fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
    /// What it fills, for its errors: "topic", or an envelope attribute.
    what: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Capture(String),
    /// Dotted path into an object payload.
    Field(Vec<String>),
}

impl Template {
    /// Parse a topic template; every `{name}` must be one of `captures`.
    pub fn parse<'a>(
        text: &str,
        captures: impl Iterator<Item = &'a str> + Clone,
    ) -> Result<Template, String> {
        Self::parse_for("topic", text, captures)
    }

    /// Parse a template that fills `what` (its errors say so).
    pub fn parse_for<'a>(
        what: &'static str,
        text: &str,
        mut captures: impl Iterator<Item = &'a str> + Clone,
    ) -> Result<Template, String> {
        if text.is_empty() {
            return Err(format!("{what} template cannot be empty"));
        }
        if text.contains(['+', '#']) {
            return Err(format!(
                "{what} template {text:?} must not contain '+' or '#'"
            ));
        }
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if rest[..open].contains('}') {
                return Err(format!("unmatched '}}' in {what} template {text:?}"));
            }
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_string()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("unclosed '{{' in {what} template {text:?}"))?;
            let name = &rest[open + 1..open + close];
            if let Some(path) = name.strip_prefix("payload.") {
                let path: Vec<String> = path.split('.').map(str::to_string).collect();
                if path.iter().any(String::is_empty) {
                    return Err(format!(
                        "{what} template {text:?}: {{{name}}} needs a field path like {{payload.serial}}"
                    ));
                }
                parts.push(Part::Field(path));
            } else if captures.clone().any(|c| c == name) {
                parts.push(Part::Capture(name.to_string()));
            } else {
                let known: Vec<&str> = captures.by_ref().collect();
                return Err(format!(
                    "{what} template {text:?} uses {{{name}}}, but the match pattern captures {} (payload fields are written {{payload.<field>}})",
                    if known.is_empty() {
                        "nothing".to_string()
                    } else {
                        format!("only {{{}}}", known.join("}, {"))
                    }
                ));
            }
            rest = &rest[open + close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("unmatched '}}' in {what} template {text:?}"));
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(Template { parts, what })
    }

    /// Fill in the captures and payload fields of one event. A payload field
    /// that is missing, not a string, number or bool, or that would put a
    /// wildcard into the topic is an error (the destination is skipped).
    pub fn render(
        &self,
        captures: &[(&str, &str)],
        payload: Option<&Value>,
    ) -> Result<String, String> {
        self.render_with(captures, payload, |out, v| out.push_str(v))
    }

    /// `render`, with each capture and payload field written by `fill`
    /// (a CloudEvent's `source` percent-encodes them).
    pub fn render_with(
        &self,
        captures: &[(&str, &str)],
        payload: Option<&Value>,
        fill: impl Fn(&mut String, &str),
    ) -> Result<String, String> {
        let mut out = String::with_capacity(64);
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Capture(name) => {
                    // Parse checked the name exists in the pattern, and a match fills every capture.
                    if let Some((_, v)) = captures.iter().find(|(n, _)| n == name) {
                        fill(&mut out, v);
                    }
                }
                Part::Field(path) => {
                    let mut v = payload;
                    for key in path {
                        v = v.and_then(|v| v.get(key));
                    }
                    let text = match v {
                        Some(Value::String(s)) => s.clone(),
                        Some(Value::Number(n)) => n.to_string(),
                        Some(Value::Bool(b)) => b.to_string(),
                        _ => {
                            return Err(format!(
                                "{} field payload.{} is missing or not a string, number or bool",
                                self.what,
                                path.join(".")
                            ));
                        }
                    };
                    // One field fills one level: a `/` would move the
                    // event to another topic tree (a command to another
                    // device's topic).
                    if text.is_empty()
                        || text.contains(['+', '#', '/'])
                        || text.chars().any(char::is_control)
                    {
                        return Err(format!(
                            "{} field payload.{} = {text:?} cannot go into {} (it fills one level: no / + # or control characters, not empty)",
                            self.what,
                            path.join("."),
                            if self.what == "topic" {
                                "a topic"
                            } else {
                                self.what
                            }
                        ));
                    }
                    fill(&mut out, &text);
                }
            }
        }
        // MQTT writes a topic's length in two bytes; a longer one would be
        // cut on the wire, onto another topic.
        if out.len() > MAX_TOPIC {
            return Err(format!(
                "the topic would be {} bytes; MQTT allows {MAX_TOPIC}",
                out.len()
            ));
        }
        Ok(out)
    }
}

/// The longest topic MQTT can carry, in bytes.
pub const MAX_TOPIC: usize = 65_535;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_captures_into_text() {
        let t =
            Template::parse("plant/{site}/{device}/temp", ["site", "device"].into_iter()).unwrap();
        assert_eq!(
            t.render(&[("site", "a"), ("device", "t1")], None),
            Ok("plant/a/t1/temp".to_string())
        );
    }

    #[test]
    fn renders_payload_fields() {
        let t = Template::parse("fleet/{payload.meta.serial}/{d}", ["d"].into_iter()).unwrap();
        let p = json!({"meta": {"serial": 42}});
        assert_eq!(
            t.render(&[("d", "x")], Some(&p)),
            Ok("fleet/42/x".to_string())
        );
        assert!(t.render(&[("d", "x")], Some(&json!({}))).is_err());
        for bad in ["a/b", "", "+", "x#", "a\u{1}b"] {
            let p = json!({"meta": {"serial": bad}});
            assert!(t.render(&[("d", "x")], Some(&p)).is_err(), "{bad:?}");
        }
        let long = json!({"meta": {"serial": "a".repeat(70_000)}});
        let e = t.render(&[("d", "x")], Some(&long)).unwrap_err();
        assert!(e.contains("MQTT allows 65535"), "{e}");
        assert!(t.render(&[("d", "x")], None).is_err());
        let wild = json!({"meta": {"serial": "a/#"}});
        assert!(t.render(&[("d", "x")], Some(&wild)).is_err());
    }

    #[test]
    fn unknown_capture_names_the_known_ones() {
        let e = Template::parse("x/{dev}", ["device"].into_iter()).unwrap_err();
        assert!(e.contains("{dev}") && e.contains("{device}"), "{e}");
        assert!(Template::parse("x/{dev", ["dev"].into_iter()).is_err());
        assert!(Template::parse("}{dev}", ["dev"].into_iter()).is_err());
        assert!(Template::parse("x/+", std::iter::empty()).is_err());
        assert!(Template::parse("x/{payload.}", std::iter::empty()).is_err());
    }
}
