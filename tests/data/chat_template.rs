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
                        id: None,
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
        extra: Default::default(),
    }
}

#[test]
fn chat_template_matches_python_jinja() {
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("../fixtures/chat_template/rendered.json")).unwrap();
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
        serde_json::from_str(include_str!("../fixtures/chat_template/rendered.json")).unwrap();
    assert_eq!(
        fixture["template"].as_str().unwrap(),
        trainyard::tokenize::chat::JINJA_TEMPLATE,
        "the Jinja template changed: rerun tests/fixtures/chat_template/generate.py"
    );
}

mod apply_chat_template_parity {
    //! Models' own chat templates, rendered and tokenized as transformers'
    //! `apply_chat_template` does: Qwen2.5 (with and without tools), Llama 3 / 3.1,
    //! Mistral v0.1 / Mixtral / v0.3 with tools, trainyard's own, and TRL's
    //! generation-block variants with their assistant masks (fixture made by
    //! transformers itself: tests/fixtures/chat_templates/generate.py).

    use std::path::{Path, PathBuf};

    use serde_json::Value;
    use trainyard::tokenize::template::{
        ChatTemplate, Conversation, TemplateChoice, TemplateError, span_mask,
    };

    fn root() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
    }

    fn fixture() -> Value {
        let text = std::fs::read_to_string(root().join("tests/fixtures/chat_templates/cases.json"))
            .unwrap();
        serde_json::from_str(&text).unwrap()
    }

    fn template_for(fixture: &Value, case: &Value) -> ChatTemplate {
        let dir = root().join(case["tokenizer"].as_str().unwrap());
        let file = if case["template_from_tokenizer"].as_bool().unwrap() {
            None
        } else {
            let name = case["template"].as_str().unwrap();
            Some(root().join(fixture["templates"][name]["file"].as_str().unwrap()))
        };
        let extra = case["template_kwargs"]
            .as_object()
            .map(|kwargs| {
                kwargs
                    .iter()
                    .map(|(key, value)| {
                        (
                            key.clone(),
                            serde_json::from_value::<minijinja::Value>(value.clone()).unwrap(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let has_trainyard_tokens = case["template"] == "trainyard";
        ChatTemplate::for_tokenizer(
            &dir,
            TemplateChoice::Auto,
            file.as_deref(),
            has_trainyard_tokens,
            extra,
        )
        .unwrap_or_else(|error| panic!("{}: {error}", case["name"]))
    }

    /// The case's conversation with its keys in the fixture's order (serde_json's
    /// `Value` would sort them, and templates print tools and arguments in order).
    fn conversation(case: &Value) -> Conversation {
        let text = std::fs::read_to_string(root().join("tests/fixtures/chat_templates/cases.json"))
            .unwrap();
        let ordered: minijinja::Value = serde_json::from_str(&text).unwrap();
        let name = case["name"].as_str().unwrap();
        for list in ["cases", "errors"] {
            for record in ordered.get_attr(list).unwrap().try_iter().unwrap() {
                if record.get_attr("name").unwrap().as_str() == Some(name) {
                    return Conversation::from_record(&record).unwrap();
                }
            }
        }
        panic!("no case {name}")
    }

    fn tokenizer(dir: &Path) -> tokenizers::Tokenizer {
        tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap()
    }

    #[test]
    fn rendered_text_and_ids_equal_apply_chat_template() {
        let fixture = fixture();
        let cases = fixture["cases"].as_array().unwrap();
        assert!(cases.len() >= 40);
        let mut families = std::collections::BTreeSet::new();
        for case in cases {
            let name = case["name"].as_str().unwrap();
            let template = template_for(&fixture, case);
            let rendered = template
                .render(
                    &conversation(case),
                    case["add_generation_prompt"].as_bool().unwrap(),
                )
                .unwrap_or_else(|error| panic!("{name}: {error}"));
            assert_eq!(rendered.text, case["rendered"].as_str().unwrap(), "{name}");
            let tokenizer = tokenizer(&root().join(case["tokenizer"].as_str().unwrap()));
            let ids = tokenizer.encode(rendered.text.as_str(), false).unwrap();
            let expected: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
            assert_eq!(ids.get_ids(), expected.as_slice(), "{name}");
            families.insert(case["template"].as_str().unwrap().to_string());
        }
        for family in [
            "qwen2_5",
            "llama3_1",
            "mistral_v0_1",
            "mistral_v0_3_tools",
            "trainyard",
        ] {
            assert!(families.contains(family), "no case for {family}");
        }
    }

    #[test]
    fn generation_block_masks_equal_return_assistant_tokens_mask() {
        let fixture = fixture();
        let mut checked = 0;
        for case in fixture["cases"].as_array().unwrap() {
            let Some(expected) = case.get("assistant_masks") else {
                continue;
            };
            let name = case["name"].as_str().unwrap();
            let template = template_for(&fixture, case);
            assert!(template.has_generation_blocks(), "{name}");
            let conversation = conversation(case);
            let rendered = template
                .render(
                    &conversation,
                    case["add_generation_prompt"].as_bool().unwrap(),
                )
                .unwrap();
            let spans = template.trainable_spans(&conversation, &rendered).unwrap();
            let expected_spans: Vec<std::ops::Range<usize>> = case["generation_spans"]
                .as_array()
                .unwrap()
                .iter()
                .map(|span| {
                    // The fixture's spans are character offsets; ours are bytes.
                    let to_byte = |chars: u64| {
                        rendered
                            .text
                            .char_indices()
                            .nth(chars as usize)
                            .map_or(rendered.text.len(), |(byte, _)| byte)
                    };
                    to_byte(span[0].as_u64().unwrap())..to_byte(span[1].as_u64().unwrap())
                })
                .collect();
            assert_eq!(spans, expected_spans, "{name}");
            let tokenizer = tokenizer(&root().join(case["tokenizer"].as_str().unwrap()));
            let encoding = tokenizer.encode(rendered.text.as_str(), false).unwrap();
            let mask = span_mask(encoding.get_offsets(), &spans);
            let expected: Vec<u8> = serde_json::from_value(expected.clone()).unwrap();
            assert_eq!(mask, expected, "{name}");
            checked += 1;
        }
        assert!(checked >= 10);
    }

    #[test]
    fn prefix_masks_cover_each_answer_and_its_end_of_turn() {
        // Without generation blocks, the trained text of every assistant turn is what
        // that turn adds after the generation prompt: its answer and end-of-turn token.
        let fixture = fixture();
        let end_of_turn = [
            ("qwen2_5", "<|im_end|>"),
            ("llama3_1", "<|eot_id|>"),
            ("llama3", "<|eot_id|>"),
            ("mistral_v0_1", "</s>"),
            ("trainyard", "<|end|>"),
        ];
        let mut checked = 0;
        for case in fixture["cases"].as_array().unwrap() {
            let family = case["template"].as_str().unwrap();
            let Some((_, end)) = end_of_turn.iter().find(|(name, _)| *name == family) else {
                continue;
            };
            let name = case["name"].as_str().unwrap();
            let template = template_for(&fixture, case);
            let conversation = conversation(case);
            let rendered = template.render(&conversation, false).unwrap();
            let spans = template.trainable_spans(&conversation, &rendered).unwrap();
            let answers: Vec<&Value> = case["messages"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|message| message["role"] == "assistant")
                .collect();
            assert_eq!(spans.len(), answers.len(), "{name}");
            for (span, answer) in spans.iter().zip(answers) {
                let text = &rendered.text[span.clone()];
                assert!(text.ends_with(end), "{name}: {text:?}");
                if let Some(content) = answer["content"].as_str()
                    && !content.trim().is_empty()
                {
                    assert!(text.contains(content.trim()), "{name}: {text:?}");
                }
                checked += 1;
            }
        }
        assert!(checked >= 10, "{checked}");
    }

    #[test]
    fn templates_that_refuse_a_conversation_say_why() {
        let fixture = fixture();
        for case in fixture["errors"].as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let template = template_for(&fixture, case);
            let error = template
                .render(
                    &conversation(case),
                    case["add_generation_prompt"].as_bool().unwrap(),
                )
                .expect_err(name);
            let expected = case["error"].as_str().unwrap();
            if case["raise_exception"].as_bool() == Some(true) {
                assert!(
                    matches!(&error, TemplateError::Raised { message, .. } if message == expected),
                    "{name}: {error}"
                );
            } else {
                assert!(
                    matches!(error, TemplateError::Render { .. }),
                    "{name}: {error}"
                );
            }
        }
    }
}
