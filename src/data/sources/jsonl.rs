//! Text JSONL: one document per line, its text from `text`, `body_text` or the chunks of
//! `chunks[].text` (joined into one document, or one document per chunk), keeping
//! `source_url` (from `url` or `source_url`), `chunk_id` and `section_path`.

use std::collections::VecDeque;
use std::path::Path;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{Document, JsonLines, Problem, SourceError, json_type};
use crate::data::records::TextRecord;

/// What to do with a document made of `chunks`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ChunkMode {
    /// One document: the chunks' texts joined by a blank line.
    #[default]
    Join,
    /// One document per chunk, each with its own `chunk_id` (its index when it has none).
    Split,
}

/// Which field holds the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TextField {
    /// `text`, else `body_text`, else `chunks`.
    Auto,
    /// This field: a string, or an array of chunks (objects with `text`, or strings).
    Named(String),
}

impl TextField {
    /// `auto` → [`TextField::Auto`], anything else names a field.
    pub fn parse(field: &str) -> TextField {
        if field == "auto" {
            TextField::Auto
        } else {
            TextField::Named(field.to_string())
        }
    }
}

/// Reads text documents from one JSONL file, one line at a time.
pub struct JsonlReader {
    lines: JsonLines,
    text_field: TextField,
    chunks: ChunkMode,
    pending: VecDeque<TextRecord>,
}

impl JsonlReader {
    /// Opens `path`.
    pub fn open(
        path: &Path,
        text_field: TextField,
        chunks: ChunkMode,
    ) -> Result<JsonlReader, SourceError> {
        Ok(JsonlReader {
            lines: JsonLines::open(path)?,
            text_field,
            chunks,
            pending: VecDeque::new(),
        })
    }
}

impl Iterator for JsonlReader {
    type Item = Result<Document, SourceError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(record) = self.pending.pop_front() {
                return Some(Ok(Document::Text(record)));
            }
            let (line, object) = match self.lines.next_object()? {
                Ok(found) => found,
                Err(error) => return Some(Err(error)),
            };
            match documents(&object, &self.text_field, self.chunks) {
                Ok(records) => self.pending.extend(records),
                Err(problem) => {
                    return Some(Err(SourceError::record(self.lines.location(line), problem)));
                }
            }
        }
    }
}

/// The documents of one JSONL object.
pub fn documents(
    object: &Map<String, Value>,
    text_field: &TextField,
    mode: ChunkMode,
) -> Result<Vec<TextRecord>, Problem> {
    let present = |key: &str| object.get(key).filter(|value| !value.is_null());
    let (key, value) = match text_field {
        TextField::Auto => ["text", "body_text", "chunks"]
            .into_iter()
            .find_map(|key| present(key).map(|value| (key.to_string(), value)))
            .ok_or_else(|| Problem::MissingText {
                expected: r#"expected a "text", "body_text" or "chunks" field"#.to_string(),
            })?,
        TextField::Named(field) => present(field)
            .map(|value| (field.clone(), value))
            .ok_or_else(|| Problem::MissingText {
                expected: format!("expected a {:?} field", field),
            })?,
    };
    let base = TextRecord {
        text: String::new(),
        source_url: url(object, "")?,
        chunk_id: chunk_id(object, "")?,
        section_path: section_path(object, "")?,
    };
    match value {
        Value::String(text) => Ok(vec![TextRecord {
            text: text.clone(),
            ..base
        }]),
        Value::Array(chunks) if key != "text" && key != "body_text" => {
            let mut records = Vec::with_capacity(chunks.len());
            for (index, chunk) in chunks.iter().enumerate() {
                records.push(chunk_record(chunk, &key, index, &base)?);
            }
            Ok(match mode {
                ChunkMode::Split => records,
                ChunkMode::Join => {
                    let texts: Vec<&str> = records.iter().map(|r| r.text.as_str()).collect();
                    vec![TextRecord {
                        text: texts.join("\n\n"),
                        ..base
                    }]
                }
            })
        }
        other => Err(Problem::NotText {
            key,
            found: json_type(other),
        }),
    }
}

/// Chunk `index` of the array under `key`, with its own metadata where it has some.
fn chunk_record(
    chunk: &Value,
    key: &str,
    index: usize,
    base: &TextRecord,
) -> Result<TextRecord, Problem> {
    let at = format!("{key}[{index}]");
    match chunk {
        Value::String(text) => Ok(TextRecord {
            text: text.clone(),
            chunk_id: Some(index.to_string()),
            ..base.clone()
        }),
        Value::Object(fields) => {
            let text = match fields.get("text") {
                Some(Value::String(text)) => text.clone(),
                Some(other) => {
                    return Err(Problem::NotText {
                        key: format!("{at}.text"),
                        found: json_type(other),
                    });
                }
                None => {
                    return Err(Problem::MissingText {
                        expected: format!("{at}: expected a \"text\" field"),
                    });
                }
            };
            let prefix = format!("{at}.");
            Ok(TextRecord {
                text,
                source_url: url(fields, &prefix)?.or_else(|| base.source_url.clone()),
                chunk_id: Some(chunk_id(fields, &prefix)?.unwrap_or_else(|| index.to_string())),
                section_path: section_path(fields, &prefix)?.or_else(|| base.section_path.clone()),
            })
        }
        other => Err(Problem::NotText {
            key: at,
            found: json_type(other),
        }),
    }
}

fn url(object: &Map<String, Value>, prefix: &str) -> Result<Option<String>, Problem> {
    for key in ["url", "source_url"] {
        match object.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::String(url)) => return Ok(Some(url.clone())),
            Some(other) => return Err(bad(prefix, key, "a string", other)),
        }
    }
    Ok(None)
}

fn chunk_id(object: &Map<String, Value>, prefix: &str) -> Result<Option<String>, Problem> {
    match object.get("chunk_id") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(id)) => Ok(Some(id.clone())),
        Some(Value::Number(id)) => Ok(Some(id.to_string())),
        Some(other) => Err(bad(prefix, "chunk_id", "a string or a number", other)),
    }
}

fn section_path(object: &Map<String, Value>, prefix: &str) -> Result<Option<String>, Problem> {
    let expected = "a string or an array of strings";
    match object.get("section_path") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(path)) => Ok(Some(path.clone())),
        Some(Value::Array(parts)) => {
            let parts: Option<Vec<&str>> = parts.iter().map(Value::as_str).collect();
            match parts {
                Some(parts) => Ok(Some(parts.join(" > "))),
                None => Err(Problem::BadMetadata {
                    key: format!("{prefix}section_path"),
                    expected,
                    found: "an array with a non-string element",
                }),
            }
        }
        Some(other) => Err(bad(prefix, "section_path", expected, other)),
    }
}

fn bad(prefix: &str, key: &str, expected: &'static str, found: &Value) -> Problem {
    Problem::BadMetadata {
        key: format!("{prefix}{key}"),
        expected,
        found: json_type(found),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn docs(line: &str, field: &str, mode: ChunkMode) -> Result<Vec<TextRecord>, Problem> {
        let Value::Object(object) = serde_json::from_str(line).unwrap() else {
            panic!("not an object");
        };
        documents(&object, &TextField::parse(field), mode)
    }

    #[test]
    fn auto_takes_text_then_body_text_then_chunks() {
        let one = docs(
            r#"{"text": "a", "body_text": "b", "url": "u"}"#,
            "auto",
            ChunkMode::Join,
        )
        .unwrap();
        assert_eq!(one[0].text, "a");
        assert_eq!(one[0].source_url.as_deref(), Some("u"));
        let body = docs(r#"{"body_text": "b"}"#, "auto", ChunkMode::Join).unwrap();
        assert_eq!(body[0].text, "b");
        let chunks = r#"{"url": "u", "section_path": ["A", "B"], "chunks": [{"text": "x", "chunk_id": 7}, {"text": "y", "section_path": "C"}]}"#;
        let joined = docs(chunks, "auto", ChunkMode::Join).unwrap();
        assert_eq!(joined.len(), 1);
        assert_eq!(joined[0].text, "x\n\ny");
        assert_eq!(joined[0].section_path.as_deref(), Some("A > B"));
        let split = docs(chunks, "auto", ChunkMode::Split).unwrap();
        assert_eq!(split.len(), 2);
        assert_eq!(
            (split[0].text.as_str(), split[0].chunk_id.as_deref()),
            ("x", Some("7"))
        );
        assert_eq!(
            (
                split[1].chunk_id.as_deref(),
                split[1].section_path.as_deref()
            ),
            (Some("1"), Some("C"))
        );
        assert_eq!(split[1].source_url.as_deref(), Some("u"));
    }

    #[test]
    fn a_named_field_may_hold_text_or_chunks() {
        let named = docs(
            r#"{"content": "c", "text": "t"}"#,
            "content",
            ChunkMode::Join,
        )
        .unwrap();
        assert_eq!(named[0].text, "c");
        let parts = docs(r#"{"parts": ["p", "q"]}"#, "parts", ChunkMode::Split).unwrap();
        assert_eq!(parts.len(), 2);
        let missing = docs(r#"{"text": "t"}"#, "content", ChunkMode::Join).unwrap_err();
        assert_eq!(missing.to_string(), r#"expected a "content" field"#);
    }

    #[test]
    fn wrong_types_name_the_key() {
        let problem = docs(r#"{"text": 3}"#, "auto", ChunkMode::Join).unwrap_err();
        assert_eq!(
            problem.to_string(),
            r#""text" must be text, found a number"#
        );
        let problem = docs(
            r#"{"chunks": [{"text": "a"}, {"txt": "b"}]}"#,
            "auto",
            ChunkMode::Join,
        )
        .unwrap_err();
        assert_eq!(problem.to_string(), r#"chunks[1]: expected a "text" field"#);
        let problem = docs(r#"{"text": "a", "url": 5}"#, "auto", ChunkMode::Join).unwrap_err();
        assert_eq!(
            problem.to_string(),
            r#""url" must be a string, found a number"#
        );
        let problem = docs(r#"{"title": "a"}"#, "auto", ChunkMode::Join).unwrap_err();
        assert_eq!(problem.key(), "missing_text");
    }
}
