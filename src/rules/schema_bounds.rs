//! What a schema file may cost, checked when it is loaded: the validator
//! (jsonschema) has no budget of its own, and a schema that passes `check`
//! must not stall or kill the router on the first event.
//!
//! - Files (the schema and every file a `$ref` names) are regular files of
//!   at most 1 MiB inside the rules directory: not a FIFO that blocks the
//!   reload forever, not `/dev/zero`, not `/etc/passwd`.
//! - `$ref`s followed from the root nest at most [`MAX_REF_DEPTH`] deep
//!   (a chain of 100,000 overflowed the router's stack on the first event).
//! - The schema, with every `$ref` inlined (cycles cut), has at most
//!   [`MAX_NODES`] subschemas: a 1.5 KB file of `anyOf`s of two `$ref`s
//!   to the next level expands to 2^24 and the validator explored them all
//!   for a failing event (24 GB, then the OOM killer).
//! - A `pattern` compiles to at most 2 MiB, as a rule's `matches()`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// Largest schema file, and largest file a `$ref` may read.
pub const MAX_FILE: u64 = 1 << 20;
/// `$ref`s followed within one another, from the root.
pub const MAX_REF_DEPTH: usize = 32;
/// Subschemas of the schema with its `$ref`s inlined.
pub const MAX_NODES: usize = 50_000;
/// Compiled size of one `pattern` (the regex crate's measure).
pub const MAX_PATTERN: usize = 2 << 20;

/// Read a schema file (or one a `$ref` names), refusing what is not a
/// regular file of sane size inside `root`. `Err((message, unreadable))`.
pub fn read(path: &Path, root: &Path) -> Result<String, (String, bool)> {
    let meta = std::fs::metadata(path)
        .map_err(|e| (format!("cannot read {}: {e}", path.display()), true))?;
    if !meta.is_file() {
        return Err((format!("{} is not a regular file", path.display()), false));
    }
    if meta.len() > MAX_FILE {
        return Err((
            format!(
                "{} is {} bytes; a schema file may have at most {MAX_FILE}",
                path.display(),
                meta.len()
            ),
            false,
        ));
    }
    let real = std::fs::canonicalize(path)
        .map_err(|e| (format!("cannot read {}: {e}", path.display()), true))?;
    let root = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
    if !real.starts_with(&root) {
        return Err((
            format!(
                "{} is outside the rules directory {} (schemas and the files their $refs name live there)",
                path.display(),
                root.display()
            ),
            false,
        ));
    }
    std::fs::read_to_string(path)
        .map_err(|e| (format!("cannot read {}: {e}", path.display()), true))
}

/// The `$ref` retriever: `file://` URIs through [`read`], nothing else
/// (no network: a gateway's schemas are on its disk).
pub struct Retriever {
    pub root: PathBuf,
}

impl jsonschema::Retrieve for Retriever {
    fn retrieve(
        &self,
        uri: &jsonschema::Uri<String>,
    ) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
        if uri.scheme().as_str() != "file" {
            return Err(
                format!("{uri}: only $refs to files next to the schema are resolved").into(),
            );
        }
        let path = PathBuf::from(percent_decode(uri.path().as_str()));
        let text = read(&path, &self.root).map_err(|(m, _)| m)?;
        Ok(serde_json::from_str(&text)?)
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).and_then(|c| hex(*c)),
            b.get(i + 2).and_then(|c| hex(*c)),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Check how far `schema` (from the file `path`) expands; the problem if
/// too far. `$ref`s to other files are followed in `root`; anything this
/// cannot resolve is left to the validator, which reports it.
pub fn expansion(schema: &Value, path: &Path, root: &Path) -> Result<(), String> {
    let mut walk = Walk {
        root,
        docs: HashMap::new(),
        nodes: 0,
        stack: Vec::new(),
    };
    walk.docs.insert(path.to_path_buf(), schema.clone());
    let doc = path.to_path_buf();
    walk.visit(&doc, schema, 0)
}

struct Walk<'a> {
    root: &'a Path,
    docs: HashMap<PathBuf, Value>,
    nodes: usize,
    /// The `$ref` targets being expanded: one met again is a cycle.
    stack: Vec<(PathBuf, String)>,
}

impl Walk<'_> {
    fn visit(&mut self, doc: &Path, v: &Value, refs: usize) -> Result<(), String> {
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err(format!(
                "with its $refs followed it has more than {MAX_NODES} subschemas (a $ref used twice at each level doubles it); a validation could take minutes and gigabytes"
            ));
        }
        match v {
            Value::Object(map) => {
                for (k, child) in map {
                    match (k.as_str(), child) {
                        ("$ref" | "$dynamicRef", Value::String(r)) => self.follow(doc, r, refs)?,
                        // Values, not subschemas.
                        ("const" | "enum" | "default" | "examples", _) => {}
                        _ => self.visit(doc, child, refs)?,
                    }
                }
            }
            Value::Array(items) => {
                for child in items {
                    self.visit(doc, child, refs)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn follow(&mut self, doc: &Path, r: &str, refs: usize) -> Result<(), String> {
        if refs + 1 > MAX_REF_DEPTH {
            return Err(format!(
                "its $refs nest more than {MAX_REF_DEPTH} deep (the validator recurses once per level)"
            ));
        }
        let (file, pointer) = r.split_once('#').unwrap_or((r, ""));
        let target = match file {
            "" => doc.to_path_buf(),
            f if f.contains("://") => return Ok(()),
            f => doc.parent().unwrap_or(Path::new(".")).join(f),
        };
        if !self.docs.contains_key(&target) {
            let Ok(text) = read(&target, self.root) else {
                return Ok(());
            };
            let Ok(value) = serde_json::from_str::<Value>(&text) else {
                return Ok(());
            };
            self.docs.insert(target.clone(), value);
        }
        let key = (target.clone(), pointer.to_string());
        if self.stack.contains(&key) {
            return Ok(());
        }
        let Some(sub) = self.docs[&target].pointer(pointer).cloned() else {
            return Ok(());
        };
        self.stack.push(key);
        let out = self.visit(&target, &sub, refs + 1);
        self.stack.pop();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// `a0 = anyOf[$ref a1, $ref a1]`, ..., `ak = {required: [x]}`.
    fn doubling(k: usize) -> Value {
        let mut defs = serde_json::Map::new();
        for i in 0..k {
            let next = format!("#/$defs/a{}", i + 1);
            defs.insert(
                format!("a{i}"),
                json!({"anyOf": [{"$ref": next}, {"$ref": next}]}),
            );
        }
        defs.insert(format!("a{k}"), json!({"required": ["x"]}));
        json!({"$ref": "#/$defs/a0", "$defs": defs})
    }

    #[test]
    fn a_schema_that_doubles_per_level_is_refused() {
        let p = Path::new("/r/s.json");
        assert!(expansion(&doubling(10), p, Path::new("/r")).is_ok());
        let e = expansion(&doubling(24), p, Path::new("/r")).unwrap_err();
        assert!(e.contains("more than 50000 subschemas"), "{e}");
    }

    #[test]
    fn a_long_ref_chain_is_refused_and_recursion_is_not() {
        let mut defs = serde_json::Map::new();
        for i in 0..40 {
            defs.insert(
                format!("a{i}"),
                json!({"$ref": format!("#/$defs/a{}", i + 1)}),
            );
        }
        defs.insert("a40".into(), json!({"type": "object"}));
        let chain = json!({"$ref": "#/$defs/a0", "$defs": defs});
        let e = expansion(&chain, Path::new("/r/s.json"), Path::new("/r")).unwrap_err();
        assert!(e.contains("nest more than 32"), "{e}");
        let tree = json!({"type": "object", "properties": {"child": {"$ref": "#"}, "kids": {"items": {"$ref": "#"}}}});
        assert!(expansion(&tree, Path::new("/r/s.json"), Path::new("/r")).is_ok());
    }

    #[test]
    fn only_regular_files_inside_the_rules_directory_are_read() {
        let d = tempfile::tempdir().unwrap();
        let (m, unreadable) = read(Path::new("/dev/zero"), d.path()).unwrap_err();
        assert!(m.contains("not a regular file") && !unreadable, "{m}");
        let (m, _) = read(Path::new("/etc/passwd"), d.path()).unwrap_err();
        assert!(m.contains("outside the rules directory"), "{m}");
        let (_, unreadable) = read(&d.path().join("gone.json"), d.path()).unwrap_err();
        assert!(unreadable);
        std::fs::write(d.path().join("big.json"), vec![b' '; MAX_FILE as usize + 1]).unwrap();
        let (m, _) = read(&d.path().join("big.json"), d.path()).unwrap_err();
        assert!(m.contains("at most"), "{m}");
        std::fs::write(d.path().join("ok.json"), "{}").unwrap();
        assert_eq!(read(&d.path().join("ok.json"), d.path()).unwrap(), "{}");
        assert_eq!(percent_decode("/a%20b/%C3%BC"), "/a b/ü");
    }
}
