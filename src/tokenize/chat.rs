//! The chat template, defined once. [`render`] turns a conversation into text segments
//! that know whether the model is trained on them; [`JINJA_TEMPLATE`] is the same
//! format for `tokenizer_config.json`, and a committed fixture made by Python's Jinja
//! (`tests/fixtures/chat_template/`) proves both give identical text, hence identical
//! token ids.
//!
//! ```text
//! <|system|>You are terse.<|end|><|user|>Capital of Ardel?<|end|><|assistant|>Tebris<|end|>
//! ```
//!
//! Each turn is its role token, the content, and `<|end|>`. An assistant turn appends one
//! `<|tool_call|>{"name": "…", "arguments": {…}}` per tool call before its `<|end|>`
//! (arguments as Python's `json.dumps(sort_keys=True)` writes them, which is what the
//! Jinja `tojson` filter of `transformers` produces). The loss covers an assistant turn's
//! content, its tool calls and its `<|end|>` — so the model learns to stop — but not the
//! `<|assistant|>` token that opens it, which the prompt supplies.

use crate::data::records::{ChatMessage, Role, ToolCall};
use crate::tokenize::special::{ASSISTANT, END_OF_TURN, SYSTEM, TOOL, TOOL_CALL, USER};

/// The template in Jinja, for `tokenizer_config.json`'s `chat_template`.
pub const JINJA_TEMPLATE: &str = concat!(
    "{%- for message in messages -%}",
    "{%- if message.role == 'system' -%}<|system|>{{ message.content }}<|end|>",
    "{%- elif message.role == 'user' -%}<|user|>{{ message.content }}<|end|>",
    "{%- elif message.role == 'assistant' -%}<|assistant|>",
    "{%- if message.content is string -%}{{ message.content }}{%- endif -%}",
    "{%- for call in message.tool_calls | default([]) -%}",
    "{%- set function = call.function if call.function is defined else call -%}",
    "<|tool_call|>{\"name\": \"{{ function.name }}\", \"arguments\": ",
    // No dash in this tag: it would eat the space after the arguments key.
    "{% if function.arguments is string -%}{{ function.arguments }}",
    "{%- else -%}{{ function.arguments | tojson(sort_keys=true) }}{%- endif -%}}",
    "{%- endfor -%}<|end|>",
    "{%- elif message.role == 'tool' -%}<|tool|>{{ message.content }}<|end|>",
    "{%- endif -%}",
    "{%- endfor -%}",
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}",
);

/// A piece of rendered conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// The text (special tokens written out).
    pub text: String,
    /// Whether the model is trained to produce it.
    pub trainable: bool,
}

/// Renders `messages`; with `add_generation_prompt`, ends with `<|assistant|>` so a
/// model continues with the answer.
pub fn render(messages: &[ChatMessage], add_generation_prompt: bool) -> Vec<Segment> {
    let mut segments = Vec::with_capacity(messages.len() * 2 + 1);
    let fixed = |text: String| Segment {
        text,
        trainable: false,
    };
    for message in messages {
        match message.role {
            Role::System => {
                segments.push(fixed(format!("{SYSTEM}{}{END_OF_TURN}", message.content)))
            }
            Role::User => segments.push(fixed(format!("{USER}{}{END_OF_TURN}", message.content))),
            Role::Tool => segments.push(fixed(format!("{TOOL}{}{END_OF_TURN}", message.content))),
            Role::Assistant => {
                segments.push(fixed(ASSISTANT.to_string()));
                let mut answer = message.content.clone();
                for call in &message.tool_calls {
                    answer.push_str(&render_tool_call(call));
                }
                answer.push_str(END_OF_TURN);
                segments.push(Segment {
                    text: answer,
                    trainable: true,
                });
            }
        }
    }
    if add_generation_prompt {
        segments.push(fixed(ASSISTANT.to_string()));
    }
    segments
}

/// The whole rendered text.
pub fn render_text(messages: &[ChatMessage], add_generation_prompt: bool) -> String {
    render(messages, add_generation_prompt)
        .into_iter()
        .map(|segment| segment.text)
        .collect()
}

/// `<|tool_call|>{"name": "…", "arguments": {…}}`.
pub fn render_tool_call(call: &ToolCall) -> String {
    format!(
        "{TOOL_CALL}{{\"name\": \"{}\", \"arguments\": {}}}",
        call.name,
        python_json(&call.arguments)
    )
}

/// JSON as Python's `json.dumps(value, sort_keys=True, ensure_ascii=False)` writes it:
/// `", "` and `": "` separators, keys sorted, non-ASCII kept.
pub fn python_json(value: &serde_json::Value) -> String {
    use serde_json::Value;
    match value {
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(python_json).collect();
            format!("[{}]", items.join(", "))
        }
        Value::Object(map) => {
            let mut sorted: Vec<(&String, &Value)> = map.iter().collect();
            sorted.sort_by(|a, b| a.0.cmp(b.0));
            let entries: Vec<String> = sorted
                .into_iter()
                .map(|(key, value)| {
                    format!("{}: {}", Value::String(key.clone()), python_json(value))
                })
                .collect();
            format!("{{{}}}", entries.join(", "))
        }
        Value::Number(number) if number.is_f64() => {
            python_float(number.as_f64().unwrap_or(f64::NAN))
        }
        other => other.to_string(),
    }
}

/// A float as Python's `repr` writes it (`1.0`, `0.1`, `1e-07`, `1e+16`).
pub(crate) fn python_float(value: f64) -> String {
    if value.is_finite() && value == value.trunc() && value.abs() < 1e16 {
        return format!("{value:.1}");
    }
    let shortest = format!("{value:e}");
    let (mantissa, exponent) = shortest.split_once('e').unwrap_or((&shortest, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    if (-5..16).contains(&exponent) {
        format!("{value}")
    } else {
        format!(
            "{mantissa}e{}{:02}",
            if exponent < 0 { '-' } else { '+' },
            exponent.abs()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(role: Role, content: &str) -> ChatMessage {
        ChatMessage {
            role,
            content: content.to_string(),
            tool_calls: Vec::new(),
            extra: Default::default(),
        }
    }

    #[test]
    fn assistant_content_and_end_of_turn_are_trainable_nothing_else() {
        let conversation = [
            message(Role::System, "Be brief."),
            message(Role::User, "Hi?"),
            message(Role::Assistant, "Hello."),
        ];
        let segments = render(&conversation, false);
        let trainable: Vec<&str> = segments
            .iter()
            .filter(|s| s.trainable)
            .map(|s| s.text.as_str())
            .collect();
        assert_eq!(trainable, ["Hello.<|end|>"]);
        assert_eq!(
            render_text(&conversation, true),
            "<|system|>Be brief.<|end|><|user|>Hi?<|end|><|assistant|>Hello.<|end|><|assistant|>"
        );
    }

    #[test]
    fn tool_calls_render_like_python_json() {
        let mut call = message(Role::Assistant, "");
        call.tool_calls.push(ToolCall {
 id: None,
            name: "weather".into(),
            arguments: serde_json::json!({ "unit": "°C", "city": "Ardel", "days": [1, 2], "p": 0.5, "n": null }),
        });
        assert_eq!(
            render_text(&[call], false),
            "<|assistant|><|tool_call|>{\"name\": \"weather\", \"arguments\": {\"city\": \"Ardel\", \"days\": [1, 2], \"n\": null, \"p\": 0.5, \"unit\": \"°C\"}}<|end|>"
        );
        assert_eq!(python_float(1.0), "1.0");
        assert_eq!(python_float(1e-7), "1e-07");
        assert_eq!(python_float(2.5e20), "2.5e+20");
        assert_eq!(python_float(0.1), "0.1");
    }
}
