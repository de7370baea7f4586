//! Topic templates: `site/{site}/{device}/temp`, filled from captures.

/// A compiled template: literal text and capture references.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Capture(String),
}

impl Template {
    /// Parse `text`; every `{name}` must be one of `captures`.
    pub fn parse<'a>(
        text: &str,
        mut captures: impl Iterator<Item = &'a str> + Clone,
    ) -> Result<Template, String> {
        if text.is_empty() {
            return Err("topic template cannot be empty".into());
        }
        if text.contains(['+', '#']) {
            return Err(format!(
                "topic template {text:?} must not contain '+' or '#'"
            ));
        }
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if rest[..open].contains('}') {
                return Err(format!("unmatched '}}' in topic template {text:?}"));
            }
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_string()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("unclosed '{{' in topic template {text:?}"))?;
            let name = &rest[open + 1..open + close];
            if !captures.clone().any(|c| c == name) {
                let known: Vec<&str> = captures.by_ref().collect();
                return Err(format!(
                    "topic template {text:?} uses {{{name}}}, but the match pattern captures {}",
                    if known.is_empty() {
                        "nothing".to_string()
                    } else {
                        format!("only {{{}}}", known.join("}, {"))
                    }
                ));
            }
            parts.push(Part::Capture(name.to_string()));
            rest = &rest[open + close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("unmatched '}}' in topic template {text:?}"));
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(Template { parts })
    }

    /// Fill in the captures of one event.
    pub fn render(&self, captures: &[(&str, &str)]) -> String {
        let mut out = String::with_capacity(64);
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Capture(name) => {
                    // Parse checked the name exists in the pattern, and a match fills every capture.
                    if let Some((_, v)) = captures.iter().find(|(n, _)| n == name) {
                        out.push_str(v);
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_captures_into_text() {
        let t =
            Template::parse("plant/{site}/{device}/temp", ["site", "device"].into_iter()).unwrap();
        assert_eq!(
            t.render(&[("site", "a"), ("device", "t1")]),
            "plant/a/t1/temp"
        );
    }

    #[test]
    fn unknown_capture_names_the_known_ones() {
        let e = Template::parse("x/{dev}", ["device"].into_iter()).unwrap_err();
        assert!(e.contains("{dev}") && e.contains("{device}"), "{e}");
        assert!(Template::parse("x/{dev", ["dev"].into_iter()).is_err());
        assert!(Template::parse("}{dev}", ["dev"].into_iter()).is_err());
        assert!(Template::parse("x/+", std::iter::empty()).is_err());
    }
}
