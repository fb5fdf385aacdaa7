//! One pipeline or profile file, parsed: its values (as a figment dictionary), its
//! content hash, and where every key sits in the text, so any later error or origin
//! can point at `file:line`.

use std::path::{Path, PathBuf};

use figment::value::{Dict, Value};

use super::diagnostic::{Diagnostic, Location};
pub use super::key_lines::KeyLines;
use super::key_lines::join;
use super::yaml::{self, DuplicateKey, YamlFailure};

/// The two pipeline file syntaxes; both map onto one schema.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `.yaml` / `.yml`
    Yaml,
    /// `.toml`
    Toml,
}

impl Format {
    /// The format a file name implies, or `None` for an unknown extension.
    pub fn from_path(path: &Path) -> Option<Format> {
        match path.extension()?.to_str()? {
            "yaml" | "yml" => Some(Format::Yaml),
            "toml" => Some(Format::Toml),
            _ => None,
        }
    }
}

/// A parsed pipeline or profile file.
#[derive(Debug, Clone)]
pub struct SourceFile {
    /// The path as given (relative paths stay relative, for readable messages).
    pub path: PathBuf,
    /// The raw text, kept for diagnostics that quote a line.
    pub text: String,
    /// blake3 of the raw bytes, recorded in every run for audits.
    pub hash: String,
    /// Syntax of the file.
    pub format: Format,
    /// The values, as figment's dictionary type.
    pub values: Dict,
    /// Where each key is in `text`.
    pub lines: KeyLines,
}

/// The largest pipeline or profile file read (a 10,000-stage pipeline is about 1 MB).
pub const MAX_FILE_BYTES: u64 = 16 << 20;

/// The bytes of `path`, which must be a regular file of at most [`MAX_FILE_BYTES`]: a
/// device or FIFO given by mistake would otherwise be read forever.
fn read_limited(path: &Path) -> Result<Vec<u8>, Diagnostic> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let cannot_read =
        |error: std::io::Error| Diagnostic::new(format!("cannot read {}: {error}", path.display()));
    // Non-blocking: opening a FIFO for reading would otherwise wait for a writer.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(cannot_read)?;
    let metadata = file.metadata().map_err(cannot_read)?;
    if !metadata.is_file() {
        return Err(Diagnostic::new(format!(
            "{} is not a regular file; pipelines and profiles are files",
            path.display()
        )));
    }
    let mut bytes = Vec::with_capacity(metadata.len().min(MAX_FILE_BYTES) as usize);
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(cannot_read)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(Diagnostic::new(format!(
            "{} is larger than {} MiB; a pipeline file that large is not one",
            path.display(),
            MAX_FILE_BYTES >> 20
        )));
    }
    Ok(bytes)
}

impl SourceFile {
    /// Reads and parses `path`; syntax errors name file, line and column.
    pub fn load(path: &Path) -> Result<SourceFile, Diagnostic> {
        let format = Format::from_path(path).ok_or_else(|| {
            Diagnostic::new(format!(
                "{}: unsupported file type; pipeline and profile files end in .yaml, .yml or .toml",
                path.display()
            ))
        })?;
        let bytes = read_limited(path)?;
        let text = String::from_utf8(bytes).map_err(|error| {
            Diagnostic::new(format!("{} is not valid UTF-8: {error}", path.display()))
        })?;
        Self::parse(path, text, format)
    }

    /// Parses `text` as the content of `path` in `format`. A leading byte-order mark
    /// (editors on Windows write one) is part of the hash but not of the document.
    pub fn parse(path: &Path, text: String, format: Format) -> Result<SourceFile, Diagnostic> {
        let hash = blake3::hash(text.as_bytes()).to_hex().to_string();
        let text = match text.strip_prefix('\u{feff}') {
            Some(rest) => rest.to_string(),
            None => text,
        };
        let (value, lines) = match format {
            Format::Yaml => parse_yaml(path, &text)?,
            // TOML keeps a CRLF inside a multi-line string as it is (the spec lets a
            // parser normalize it), which gave `o.txt\r` file names in commands written
            // on Windows; YAML folds line breaks to LF already.
            Format::Toml => parse_toml(path, &text.replace("\r\n", "\n"))?,
        };
        let values = match value {
            Value::Dict(_, dict) => dict,
            Value::Empty(..) => Dict::new(),
            _ => {
                return Err(Diagnostic::new(format!(
                    "{}: the top level must be a map of keys (name, seed, stages, …)",
                    path.display()
                ))
                .at(Location::new(path, 1, 1), Some(&text)));
            }
        };
        Ok(SourceFile {
            path: path.to_path_buf(),
            text,
            hash,
            format,
            values,
            lines,
        })
    }

    /// A location for the key at `path` (or its nearest parent) in this file.
    pub fn location_of(&self, key_path: &str) -> Option<Location> {
        let (line, column) = self.lines.find(key_path)?;
        Some(Location::new(&self.path, line, column))
    }
}

fn parse_yaml(path: &Path, text: &str) -> Result<(Value, KeyLines), Diagnostic> {
    yaml::parse(text).map_err(|failure| match failure {
        YamlFailure::Invalid(error) => {
            let mut diagnostic = Diagnostic::new(format!(
                "invalid YAML in {}: {}",
                path.display(),
                error.message
            ))
            .at(Location::new(path, error.line, error.column), Some(text));
            if let Some(help) = error.help {
                diagnostic = diagnostic.help(help);
            }
            // `{ base: ${vars.x} }` is the likeliest way to meet this: braces end an
            // unquoted value inside a `{ … }` map, so YAML stops at the `{` of `${`.
            if diagnostic
                .quoted_line
                .as_deref()
                .is_some_and(|line| line.contains("${"))
            {
                diagnostic = diagnostic.help(
                    "inside `{ … }` or `[ … ]`, quote a value that uses a variable: \"${vars.NAME}\"",
                );
            }
            diagnostic
        }
        YamlFailure::Duplicate(DuplicateKey {
            path: key,
            first,
            second,
        }) => Diagnostic::new(format!(
            "{}: key `{key}` is given twice (lines {first} and {second}); only one can count",
            path.display()
        ))
        .at(Location::new(path, second, 1), Some(text))
        .help("remove or rename one of them"),
    })
}

fn parse_toml(path: &Path, text: &str) -> Result<(Value, KeyLines), Diagnostic> {
    let toml_error = |error: toml::de::Error| {
        let message = error.message().trim().to_string();
        let mut diagnostic =
            Diagnostic::new(format!("invalid TOML in {}: {message}", path.display()));
        if let Some(span) = error.span() {
            let (line, column) = line_column(text, span.start);
            diagnostic = diagnostic.at(Location::new(path, line, column), Some(text));
        }
        diagnostic
    };
    let table = toml::de::DeTable::parse(text).map_err(toml_error)?;
    let mut lines = KeyLines::default();
    record_toml_table(text, "", table.get_ref(), &mut lines);
    let value: Value = toml::from_str(text).map_err(toml_error)?;
    Ok((value, lines))
}

fn record_toml_table(
    text: &str,
    prefix: &str,
    table: &toml::de::DeTable<'_>,
    lines: &mut KeyLines,
) {
    for (key, value) in table.iter() {
        let path = join(prefix, key.get_ref());
        let (line, column) = line_column(text, key.span().start);
        lines.record(path.clone(), line, column);
        record_toml_value(text, &path, value.get_ref(), lines);
    }
}

fn record_toml_value(text: &str, path: &str, value: &toml::de::DeValue<'_>, lines: &mut KeyLines) {
    match value {
        toml::de::DeValue::Table(table) => record_toml_table(text, path, table, lines),
        toml::de::DeValue::Array(items) => {
            for (index, item) in items.iter().enumerate() {
                record_toml_value(text, &join(path, &index.to_string()), item.get_ref(), lines);
            }
        }
        _ => {}
    }
}

/// 1-based line and column of a byte offset.
pub fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |newline| before.len() - newline - 1)
        + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_keys_get_their_lines_in_file_order() {
        let text = "name: demo\nstages:\n  b:\n    kind: command\n    with:\n      cmd: echo\n  a:\n    kind: command\n";
        let file = SourceFile::parse(Path::new("p.yaml"), text.into(), Format::Yaml).unwrap();
        assert_eq!(file.lines.exact("stages.b.with.cmd"), Some((6, 7)));
        assert_eq!(file.lines.exact("stages.a.kind"), Some((8, 5)));
        let order: Vec<_> = file.lines.children_in_order("stages").collect();
        assert_eq!(order, ["b", "a"]);
    }

    #[test]
    fn a_repeated_yaml_key_is_an_error_naming_both_lines() {
        let text = "name: p\nstages:\n  s1:\n    kind: command\n    with: { cmd: a, cmd: b }\n  s1:\n    kind: command\n";
        let error = SourceFile::parse(Path::new("p.yaml"), text.to_string(), Format::Yaml)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("`stages.s1.with.cmd` is given twice (lines 5 and 5)"),
            "{error}"
        );
        let text = "name: p\nstages:\n  s1: { kind: command }\n  s1: { kind: command }\n";
        let error = SourceFile::parse(Path::new("p.yaml"), text.to_string(), Format::Yaml)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("`stages.s1` is given twice (lines 3 and 4)"),
            "{error}"
        );
        assert!(error.contains("p.yaml"), "{error}");
    }

    #[test]
    fn a_byte_order_mark_is_not_part_of_the_document() {
        let text = "\u{feff}name: p\nseed: 3\n";
        let file = SourceFile::parse(Path::new("p.yaml"), text.to_string(), Format::Yaml).unwrap();
        assert_eq!(file.lines.exact("seed"), Some((2, 1)));
        assert_eq!(
            file.hash,
            blake3::hash(text.as_bytes()).to_hex().to_string()
        );
        let toml = SourceFile::parse(
            Path::new("p.toml"),
            "\u{feff}name = \"p\"\n".to_string(),
            Format::Toml,
        )
        .unwrap();
        assert!(toml.values.contains_key("name"));
    }

    #[test]
    fn a_toml_multi_line_string_written_with_crlf_has_plain_newlines() {
        let text = "name = \"p\"\r\n[stages.a.with]\r\ncmd = \"\"\"\r\necho hi > o.txt\r\necho ho\r\n\"\"\"\r\n";
        let file = SourceFile::parse(Path::new("p.toml"), text.into(), Format::Toml).unwrap();
        let text = format!("{:?}", file.values);
        assert!(text.contains("echo hi > o.txt\\necho ho\\n"), "{text}");
        assert!(!text.contains("\\r"), "{text}");
        assert_eq!(file.lines.exact("stages.a.with.cmd"), Some((3, 1)));
    }

    #[test]
    fn toml_keys_get_their_lines_in_file_order() {
        let text = "name = \"demo\"\n[stages.b]\nkind = \"command\"\n[stages.b.with]\ncmd = \"echo\"\n[stages.a]\nkind = \"command\"\n";
        let file = SourceFile::parse(Path::new("p.toml"), text.into(), Format::Toml).unwrap();
        assert_eq!(file.lines.exact("stages.b.with.cmd"), Some((5, 1)));
        let order: Vec<_> = file.lines.children_in_order("stages").collect();
        assert_eq!(order, ["b", "a"]);
    }

    #[test]
    fn yaml_syntax_error_names_line_and_column() {
        let text = "name: demo\nstages:\n  a: [1, 2\n";
        let error =
            SourceFile::parse(Path::new("bad.yaml"), text.into(), Format::Yaml).unwrap_err();
        let rendered = error.to_string();
        assert!(rendered.contains("bad.yaml:"), "{rendered}");
        assert!(rendered.contains("invalid YAML"), "{rendered}");
    }

    #[test]
    fn an_unquoted_variable_in_a_flow_map_gets_a_hint_to_quote_it() {
        let text = "name: demo\nstages:\n  a:\n    inputs: { src: ${vars.base} }\n";
        let error = SourceFile::parse(Path::new("p.yaml"), text.into(), Format::Yaml).unwrap_err();
        let rendered = error.to_string();
        assert!(rendered.contains("p.yaml:4:"), "{rendered}");
        assert!(
            rendered.contains("quote a value that uses a variable"),
            "{rendered}"
        );
    }

    #[test]
    fn toml_syntax_error_names_line_and_column() {
        let text = "name = \"demo\"\n[stages.a\nkind = 1\n";
        let error =
            SourceFile::parse(Path::new("bad.toml"), text.into(), Format::Toml).unwrap_err();
        let rendered = error.to_string();
        assert!(rendered.contains("bad.toml:2:"), "{rendered}");
    }
}
