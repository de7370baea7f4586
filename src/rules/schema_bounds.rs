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
        let path = PathBuf::from(crate::percent::decode(uri.path().as_str()));
        let text = read(&path, &self.root).map_err(|(m, _)| m)?;
        Ok(serde_json::from_str(&text)?)
    }
}

/// Check how far `schema` (from the file `path`) expands; the problem if
/// too far, or if a `$ref` cannot be followed to count it (the validator
/// could follow it: a guard that skipped it would let the cost through).
/// On success, the SHA-256 of every other file its `$ref`s read, in the
/// order first read (part of the set's digest).
pub fn expansion(schema: &Value, path: &Path, root: &Path) -> Result<Vec<[u8; 32]>, Refusal> {
    let mut walk = Walk {
        root,
        docs: HashMap::new(),
        read: Vec::new(),
        nodes: 0,
        stack: Vec::new(),
    };
    walk.load(path.to_path_buf(), schema.clone());
    walk.visit(path, schema, 0, false)?;
    Ok(walk.read)
}

/// Why a schema is refused before it is compiled.
#[derive(Debug)]
pub enum Refusal {
    /// It would cost too much per event.
    Cost(String),
    /// A `$ref` cannot be followed (so neither counted nor, likely, used).
    Ref(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Cost(m) | Refusal::Ref(m) => f.write_str(m),
        }
    }
}

/// A loaded document and its `$anchor`s (name -> JSON pointer).
struct Doc {
    value: Value,
    anchors: HashMap<String, String>,
}

struct Walk<'a> {
    root: &'a Path,
    docs: HashMap<PathBuf, Doc>,
    read: Vec<[u8; 32]>,
    nodes: usize,
    /// The `$ref` targets being expanded: one met again is a cycle.
    stack: Vec<(PathBuf, String)>,
}

/// Keywords whose value is a map from names to subschemas: their keys are
/// names (a property may be called `const`), not keywords.
const SCHEMA_MAPS: [&str; 5] = [
    "properties",
    "patternProperties",
    "$defs",
    "definitions",
    "dependentSchemas",
];

impl Walk<'_> {
    fn load(&mut self, path: PathBuf, value: Value) {
        let mut anchors = HashMap::new();
        collect_anchors(&value, String::new(), &mut anchors);
        self.docs.insert(path, Doc { value, anchors });
    }

    /// `names`: `v` is a map of names to subschemas.
    fn visit(&mut self, doc: &Path, v: &Value, refs: usize, names: bool) -> Result<(), Refusal> {
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err(Refusal::Cost(format!(
                "with its $refs followed it has more than {MAX_NODES} subschemas (a $ref used twice at each level doubles it); a validation could take minutes and gigabytes"
            )));
        }
        match v {
            Value::Object(map) if names => {
                for child in map.values() {
                    self.visit(doc, child, refs, false)?;
                }
            }
            Value::Object(map) => {
                for (k, child) in map {
                    match (k.as_str(), child) {
                        ("$ref" | "$dynamicRef", Value::String(r)) => self.follow(doc, r, refs)?,
                        // Values, not subschemas.
                        ("const" | "enum" | "default" | "examples", _) => {}
                        (k, _) if SCHEMA_MAPS.contains(&k) => self.visit(doc, child, refs, true)?,
                        _ => self.visit(doc, child, refs, false)?,
                    }
                }
            }
            Value::Array(items) => {
                for child in items {
                    self.visit(doc, child, refs, false)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn follow(&mut self, doc: &Path, r: &str, refs: usize) -> Result<(), Refusal> {
        if refs + 1 > MAX_REF_DEPTH {
            return Err(Refusal::Cost(format!(
                "its $refs nest more than {MAX_REF_DEPTH} deep (the validator recurses once per level)"
            )));
        }
        let unfollowed = || {
            Refusal::Ref(format!(
                "$ref {r:?} cannot be followed to count what it costs; use a JSON pointer (\"#/$defs/x\"), an $anchor (\"#x\") or a file next to the schema (\"common.json#/$defs/x\")"
            ))
        };
        let (file, fragment) = r.split_once('#').unwrap_or((r, ""));
        let fragment = crate::percent::decode(fragment);
        let target = match file {
            "" => doc.to_path_buf(),
            f if f.contains(':') => return Err(unfollowed()),
            f => doc
                .parent()
                .unwrap_or(Path::new("."))
                .join(crate::percent::decode(f)),
        };
        if !self.docs.contains_key(&target) {
            let text = read(&target, self.root)
                .map_err(|(m, _)| Refusal::Ref(format!("$ref {r:?}: {m}")))?;
            let value = serde_json::from_str::<Value>(&text).map_err(|e| {
                Refusal::Ref(format!("$ref {r:?}: {} is not JSON: {e}", target.display()))
            })?;
            self.read.push(super::sha256([
                target.as_os_str().as_encoded_bytes(),
                &[0],
                text.as_bytes(),
            ]));
            self.load(target.clone(), value);
        }
        let d = &self.docs[&target];
        let pointer = match fragment.as_str() {
            "" => String::new(),
            p if p.starts_with('/') => p.to_string(),
            anchor => d.anchors.get(anchor).cloned().ok_or_else(unfollowed)?,
        };
        let key = (target.clone(), pointer.clone());
        if self.stack.contains(&key) {
            return Ok(());
        }
        let sub = d.value.pointer(&pointer).cloned().ok_or_else(unfollowed)?;
        self.stack.push(key);
        let out = self.visit(&target, &sub, refs + 1, false);
        self.stack.pop();
        out
    }
}

/// Every `$anchor` and `$dynamicAnchor` in `v`, with its JSON pointer.
fn collect_anchors(v: &Value, at: String, out: &mut HashMap<String, String>) {
    match v {
        Value::Object(map) => {
            for key in ["$anchor", "$dynamicAnchor"] {
                if let Some(Value::String(name)) = map.get(key) {
                    out.entry(name.clone()).or_insert_with(|| at.clone());
                }
            }
            for (k, child) in map {
                let k = k.replace('~', "~0").replace('/', "~1");
                collect_anchors(child, format!("{at}/{k}"), out);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                collect_anchors(child, format!("{at}/{i}"), out);
            }
        }
        _ => {}
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
        // The same with anchors, and with a percent-encoded pointer.
        let mut defs = serde_json::Map::new();
        for i in 0..24 {
            let next = format!("#a{}", i + 1);
            defs.insert(
                format!("a{i}"),
                json!({"$anchor": format!("a{i}"), "anyOf": [{"$ref": next}, {"$ref": next}]}),
            );
        }
        defs.insert("a24".into(), json!({"$anchor": "a24", "required": ["x"]}));
        let anchored = json!({"$ref": "#a0", "$defs": defs});
        assert!(
            expansion(&anchored, p, Path::new("/r"))
                .unwrap_err()
                .to_string()
                .contains("more than")
        );
        let encoded = serde_json::to_string(&doubling(24))
            .unwrap()
            .replace("#/$defs/", "#/%24defs/");
        let encoded: Value = serde_json::from_str(&encoded).unwrap();
        assert!(
            expansion(&encoded, p, Path::new("/r"))
                .unwrap_err()
                .to_string()
                .contains("more than")
        );
        // A property called `const` is a property, not a keyword.
        let mut hidden = doubling(24);
        hidden["properties"] = json!({"const": {"$ref": "#/$defs/a0"}});
        hidden.as_object_mut().unwrap().remove("$ref");
        assert!(
            expansion(&hidden, p, Path::new("/r"))
                .unwrap_err()
                .to_string()
                .contains("more than")
        );
        // What cannot be followed is refused, not skipped.
        let e = expansion(&json!({"$ref": "https://x/y.json"}), p, Path::new("/r")).unwrap_err();
        assert!(e.to_string().contains("cannot be followed"), "{e}");
        let e = expansion(&doubling(24), p, Path::new("/r"))
            .unwrap_err()
            .to_string();
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
        let e = expansion(&chain, Path::new("/r/s.json"), Path::new("/r"))
            .unwrap_err()
            .to_string();
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
    }
}
