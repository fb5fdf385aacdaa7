//! Where each key of a pipeline or profile file sits, by dotted key path: what every
//! error and origin uses to point at `file:line`. Both file syntaxes fill it (YAML in
//! `yaml.rs`, TOML in `source.rs`).

use std::collections::HashMap;
use std::sync::Arc;

/// Positions of every key in a file, by dotted key path (`stages.tok.with.vocab_size`),
/// plus the order in which the keys appear (maps lose it once merged by figment).
#[derive(Debug, Default, Clone)]
pub struct KeyLines {
    // One shared string per key path for both: a big pipeline has tens of thousands.
    positions: HashMap<Arc<str>, (usize, usize), foldhash::fast::RandomState>,
    order: Vec<Arc<str>>,
}

impl KeyLines {
    /// Records the position of the key at `path`.
    pub(crate) fn record(&mut self, path: String, line: usize, column: usize) {
        if let Some(position) = self.positions.get_mut(path.as_str()) {
            *position = (line, column);
            return;
        }
        let path: Arc<str> = path.into();
        self.order.push(Arc::clone(&path));
        self.positions.insert(path, (line, column));
    }

    /// Line and column (1-based) of the key at `path`, or of its nearest recorded parent.
    pub fn find(&self, path: &str) -> Option<(usize, usize)> {
        let mut candidate = path;
        loop {
            if let Some(position) = self.positions.get(candidate) {
                return Some(*position);
            }
            candidate = &candidate[..candidate.rfind('.')?];
        }
    }

    /// Line and column of exactly this key, without falling back to a parent.
    pub fn exact(&self, path: &str) -> Option<(usize, usize)> {
        self.positions.get(path).copied()
    }

    /// Direct child keys of `prefix`, in file order.
    pub fn children_in_order<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.order.iter().filter_map(move |path| {
            let rest = path.strip_prefix(prefix)?.strip_prefix('.')?;
            (!rest.contains('.')).then_some(rest)
        })
    }
}

/// The dotted key path of `key` inside `prefix`.
pub(crate) fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}
