//! The chat template is defined once: trainyard's renderer and the Jinja template it
//! exports render every conversation identically (fixture made by Python's Jinja the
//! way transformers runs it; see tests/fixtures/chat_template/generate.py).

use trainyard::data::records::{ChatMessage, Role, ToolCall};
use trainyard::tokenize::chat::render_text;

fn message_from_hf(value: &serde_json::Value) -> ChatMessage {
    let role: Role = serde_json::from_value(value["role"].clone()).unwrap();
    let tool_calls = value["tool_calls"]
        .as_array()
        .map(|calls| {
            calls
                .iter()
                .map(|call| {
                    let function = if call["function"].is_object() {
                        &call["function"]
                    } else {
                        call
                    };
                    ToolCall {
                        name: function["name"].as_str().unwrap().to_string(),
                        arguments: function["arguments"].clone(),
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    ChatMessage {
        role,
        content: value["content"].as_str().unwrap_or_default().to_string(),
        tool_calls,
    }
}

#[test]
fn chat_template_matches_python_jinja() {
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/chat_template/rendered.json")).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 5);
    for case in cases {
        let messages: Vec<ChatMessage> = case["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(message_from_hf)
            .collect();
        let add_generation_prompt = case["add_generation_prompt"].as_bool().unwrap_or(false);
        assert_eq!(
            render_text(&messages, add_generation_prompt),
            case["rendered"].as_str().unwrap()
        );
    }
}

#[test]
fn the_fixture_was_made_from_the_current_template() {
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/chat_template/rendered.json")).unwrap();
    assert_eq!(
        fixture["template"].as_str().unwrap(),
        trainyard::tokenize::chat::JINJA_TEMPLATE,
        "the Jinja template changed: rerun tests/fixtures/chat_template/generate.py"
    );
}
