//! The record types of corpus files (`train.jsonl`, `eval.jsonl`): one JSON object per
//! line, either a plain-text document or a chat conversation. Every stage that writes
//! or reads corpora uses these types, so the formats cannot drift apart.

use serde::{Deserialize, Serialize};

/// A plain-text document and where it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextRecord {
    /// The text.
    pub text: String,
    /// Where it came from (a URL, a relative file path, `synthetic://…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_url: Option<String>,
    /// Position of the chunk within its source document, as text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_id: Option<String>,
    /// Headings above the chunk, outermost first, joined with ` > `.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_path: Option<String>,
}

/// Who speaks a chat turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions that frame the conversation.
    System,
    /// The person.
    User,
    /// The model.
    Assistant,
    /// The result of a tool call.
    Tool,
}

impl Role {
    /// Lower-case name, as in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

/// A tool call made by the assistant, normalised to a name and JSON arguments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The call's id, when given (`call_0`); tool results refer to it as `tool_call_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The function's name.
    pub name: String,
    /// Its arguments, as a JSON value (OpenAI's string-encoded form is parsed on ingest).
    pub arguments: serde_json::Value,
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Who speaks.
    pub role: Role,
    /// What is said (may be empty for an assistant turn that only calls tools).
    #[serde(default)]
    pub content: String,
    /// Tool calls of an assistant turn.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// The message's other keys as given (`tool_call_id`, `name`, `reasoning_content`,
    /// …), in their order: a model's chat template may read them.
    #[serde(flatten, default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// A conversation, one line of a chat corpus.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatRecord {
    /// The turns, in order; validated conversations end on an assistant turn.
    pub messages: Vec<ChatMessage>,
    /// Tool definitions (JSON schemas) offered in the conversation, passed to the chat
    /// template as `tools`, as transformers passes them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<serde_json::Value>>,
    /// Where it came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_url: Option<String>,
}

impl ChatRecord {
    /// Characters of the conversation: the content of all its turns.
    pub fn char_count(&self) -> usize {
        self.messages
            .iter()
            .map(|message| crate::data::text::char_count(&message.content))
            .sum()
    }

    /// The text the conversation is de-duplicated and split by: every turn's role,
    /// content and tool calls.
    pub fn canonical_text(&self) -> String {
        let mut out = String::new();
        for message in &self.messages {
            out.push_str(message.role.as_str());
            out.push_str(": ");
            out.push_str(&message.content);
            for call in &message.tool_calls {
                out.push_str(" [call ");
                out.push_str(&call.name);
                out.push(' ');
                out.push_str(&call.arguments.to_string());
                out.push(']');
            }
            out.push('\n');
        }
        out
    }
}

/// A held-out question with its exact answer (`questions.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuestionRecord {
    /// The question, as the user would ask it.
    pub question: String,
    /// The exact expected answer.
    pub answer: String,
    /// An optional group (`familiar`, `paraphrased`, …): `evaluate` reports accuracy per
    /// category as well as overall.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
}
