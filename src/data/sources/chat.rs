//! Chat JSONL: one conversation per line, `{"messages": [{"role": …, "content": …}, …]}`,
//! validated (known roles, not empty, ends on an assistant turn) and normalised: OpenAI
//! tool calls `{"type": "function", "function": {"name", "arguments": "<JSON text>"}}`
//! become [`ToolCall`]s whose arguments are JSON values, and content given as a list of
//! text parts is joined.

use std::path::Path;

use serde_json::{Map, Value};

use super::{Document, JsonLines, Problem, SourceError, json_type};
use crate::data::records::{ChatMessage, ChatRecord, Role, ToolCall};

/// Reads conversations from one chat JSONL file, one line at a time.
pub struct ChatReader {
    lines: JsonLines,
}

impl ChatReader {
    /// Opens `path`.
    pub fn open(path: &Path) -> Result<ChatReader, SourceError> {
        Ok(ChatReader {
            lines: JsonLines::open(path)?,
        })
    }
}

impl Iterator for ChatReader {
    type Item = Result<Document, SourceError>;

    fn next(&mut self) -> Option<Self::Item> {
        let (line, object) = match self.lines.next_object()? {
            Ok(found) => found,
            Err(error) => return Some(Err(error)),
        };
        Some(
            conversation(&object)
                .map(Document::Chat)
                .map_err(|problem| SourceError::record(self.lines.location(line), problem)),
        )
    }
}

/// The validated, normalised conversation of one chat JSONL object.
pub fn conversation(object: &Map<String, Value>) -> Result<ChatRecord, Problem> {
    let messages = match object.get("messages") {
        Some(Value::Array(messages)) => messages,
        None | Some(Value::Null) => {
            return Err(Problem::MissingMessages {
                found: "found none".to_string(),
            });
        }
        Some(other) => {
            return Err(Problem::MissingMessages {
                found: format!("found {}", json_type(other)),
            });
        }
    };
    if messages.is_empty() {
        return Err(Problem::EmptyConversation);
    }
    let messages = messages
        .iter()
        .enumerate()
        .map(|(index, message)| self::message(index, message))
        .collect::<Result<Vec<ChatMessage>, Problem>>()?;
    let last = messages.len() - 1;
    if messages[last].role != Role::Assistant {
        return Err(Problem::NotEndingOnAssistant {
            index: last,
            last: messages[last].role.as_str(),
        });
    }
    let source_url = match object.get("url").or_else(|| object.get("source_url")) {
        None | Some(Value::Null) => None,
        Some(Value::String(url)) => Some(url.clone()),
        Some(other) => {
            return Err(Problem::BadMetadata {
                key: "url".to_string(),
                expected: "a string",
                found: json_type(other),
            });
        }
    };
    let tools = match object.get("tools") {
        None | Some(Value::Null) => None,
        Some(Value::Array(tools)) => Some(tools.clone()),
        Some(other) => {
            return Err(Problem::BadMetadata {
                key: "tools".to_string(),
                expected: "a list of tool definitions",
                found: json_type(other),
            });
        }
    };
    Ok(ChatRecord {
        messages,
        tools,
        source_url,
    })
}

fn message(index: usize, message: &Value) -> Result<ChatMessage, Problem> {
    let bad = |reason: String| Problem::BadMessage { index, reason };
    let Value::Object(fields) = message else {
        return Err(bad(format!(
            "expected an object, found {}",
            json_type(message)
        )));
    };
    let role = match fields.get("role") {
        Some(Value::String(role)) => match role.as_str() {
            "system" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "tool" => Role::Tool,
            _ => {
                return Err(Problem::UnknownRole {
                    index,
                    role: format!("{role:?}"),
                });
            }
        },
        None => return Err(bad("missing \"role\"".to_string())),
        Some(other) => {
            return Err(Problem::UnknownRole {
                index,
                role: other.to_string(),
            });
        }
    };
    let content = match fields.get("content") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(content)) => content.clone(),
        Some(Value::Array(parts)) => {
            let mut content = String::new();
            for (part_index, part) in parts.iter().enumerate() {
                let text = match part {
                    Value::String(text) => Some(text),
                    Value::Object(part) => match (part.get("type"), part.get("text")) {
                        (Some(Value::String(kind)), Some(Value::String(text)))
                            if kind == "text" =>
                        {
                            Some(text)
                        }
                        (None, Some(Value::String(text))) => Some(text),
                        _ => None,
                    },
                    _ => None,
                };
                let Some(text) = text else {
                    return Err(bad(format!(
                        "content[{part_index}] is not a text part (only {{\"type\": \"text\", \"text\": …}} parts are supported)"
                    )));
                };
                content.push_str(text);
            }
            content
        }
        Some(other) => {
            return Err(bad(format!(
                "\"content\" must be text, found {}",
                json_type(other)
            )));
        }
    };
    let tool_calls = match fields.get("tool_calls") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(calls)) if calls.is_empty() => Vec::new(),
        Some(Value::Array(calls)) => {
            if role != Role::Assistant {
                return Err(bad(format!(
                    "\"tool_calls\" are only allowed on assistant turns, this is a {} turn",
                    role.as_str()
                )));
            }
            calls
                .iter()
                .enumerate()
                .map(|(call, value)| tool_call(index, call, value))
                .collect::<Result<Vec<ToolCall>, Problem>>()?
        }
        Some(other) => {
            return Err(bad(format!(
                "\"tool_calls\" must be an array, found {}",
                json_type(other)
            )));
        }
    };
    // Keys a chat template may read (`tool_call_id`, `name`, …) stay, in order; null
    // ones go, as transformers drops them before rendering.
    let extra = fields
        .iter()
        .filter(|(key, value)| {
            !matches!(key.as_str(), "role" | "content" | "tool_calls") && !value.is_null()
        })
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    Ok(ChatMessage {
        role,
        content,
        tool_calls,
        extra,
    })
}

/// Normalises an OpenAI-style call (`{"type": "function", "function": {…}}`) or a flat one
/// (`{"name", "arguments"}`); string arguments are parsed as JSON.
fn tool_call(index: usize, call: usize, value: &Value) -> Result<ToolCall, Problem> {
    let bad = |reason: String| Problem::BadToolCall {
        index,
        call,
        reason,
    };
    let Value::Object(fields) = value else {
        return Err(bad(format!(
            "expected an object, found {}",
            json_type(value)
        )));
    };
    let function = match fields.get("function") {
        Some(Value::Object(function)) => function,
        Some(other) => {
            return Err(bad(format!(
                "\"function\" must be an object, found {}",
                json_type(other)
            )));
        }
        None => fields,
    };
    let name = match function.get("name") {
        Some(Value::String(name)) if !name.is_empty() => name.clone(),
        Some(Value::String(_)) => return Err(bad("\"name\" is empty".to_string())),
        Some(other) => {
            return Err(bad(format!(
                "\"name\" must be a string, found {}",
                json_type(other)
            )));
        }
        None => return Err(bad("missing \"name\"".to_string())),
    };
    let arguments = match function.get("arguments") {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(Value::String(text)) => serde_json::from_str(text).map_err(|error| {
            bad(format!(
                "\"arguments\" is not valid JSON text: {}",
                Problem::json(&error)
            ))
        })?,
        Some(other) => other.clone(),
    };
    let id = fields.get("id").and_then(Value::as_str).map(str::to_string);
    Ok(ToolCall {
        id,
        name,
        arguments,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<ChatRecord, Problem> {
        let Value::Object(object) = serde_json::from_str(line).unwrap() else {
            panic!("not an object");
        };
        conversation(&object)
    }

    #[test]
    fn openai_tool_calls_are_normalised_to_name_and_json_arguments() {
        let record = parse(
            r#"{"messages": [
                {"role": "system", "content": "s"},
                {"role": "user", "content": [{"type": "text", "text": "wea"}, {"type": "text", "text": "ther?"}]},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"Oslo\"}"}},
                    {"name": "time", "arguments": {"tz": "UTC"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "rain"},
                {"role": "assistant", "content": "It rains."}], "url": "u"}"#,
        )
        .unwrap();
        assert_eq!(record.messages.len(), 5);
        assert_eq!(record.messages[1].content, "weather?");
        assert_eq!(
            record.messages[2].tool_calls,
            [
                ToolCall {
                    id: Some("c1".to_string()),
                    name: "weather".to_string(),
                    arguments: serde_json::json!({"city": "Oslo"})
                },
                ToolCall {
                    id: None,
                    name: "time".to_string(),
                    arguments: serde_json::json!({"tz": "UTC"})
                }
            ]
        );
        assert_eq!(record.messages[2].content, "");
        assert_eq!(record.source_url.as_deref(), Some("u"));
    }

    #[test]
    fn invalid_conversations_name_the_message_and_reason() {
        let cases = [
            (
                r#"{"messages": []}"#,
                "empty_conversation",
                "empty conversation: \"messages\" has no turns",
            ),
            (
                r#"{"text": "x"}"#,
                "missing_messages",
                "expected a \"messages\" array, found none",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}"#,
                "unknown_role",
                "messages[1].role: unknown role \"robot\" (expected system, user, assistant or tool)",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]}"#,
                "not_ending_on_assistant",
                "the conversation ends on a user turn (messages[2]); it must end on an assistant turn",
            ),
            (
                r#"{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}]}"#,
                "bad_message",
                "messages[0]: \"content\" must be text, found a number",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "a", "tool_calls": [{"name": "f"}]}, {"role": "assistant", "content": "b"}]}"#,
                "bad_message",
                "messages[0]: \"tool_calls\" are only allowed on assistant turns, this is a user turn",
            ),
            (
                r#"{"messages": [{"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]}"#,
                "bad_tool_call",
                "messages[0].tool_calls[0]: \"arguments\" is not valid JSON text: invalid JSON at column 2: key must be a string",
            ),
        ];
        for (line, key, message) in cases {
            let problem = parse(line).unwrap_err();
            assert_eq!(
                (problem.key(), problem.to_string().as_str()),
                (key, message)
            );
        }
    }
}
