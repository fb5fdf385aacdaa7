//! The special tokens of trainyard tokenizers, with fixed ids: a tokenizer trained here
//! always starts its vocabulary with these, in this order, so a model, its token caches
//! and its exported chat template agree on them without lookups.
//!
//! | id | token | use |
//! |----|-------|-----|
//! | 0 | `<|pad|>` | padding in batches; never trained on |
//! | 1 | `<|endoftext|>` | separates documents in pretraining streams |
//! | 2 | `<|end|>` | ends every chat turn; generation stops here |
//! | 3 | `<|system|>` | starts a system turn |
//! | 4 | `<|user|>` | starts a user turn |
//! | 5 | `<|assistant|>` | starts an assistant turn (and the generation prompt) |
//! | 6 | `<|tool|>` | starts a tool-result turn |
//! | 7 | `<|tool_call|>` | starts one tool call (JSON) inside an assistant turn |

/// Padding.
pub const PAD: &str = "<|pad|>";
/// End of a document.
pub const END_OF_TEXT: &str = "<|endoftext|>";
/// End of a chat turn.
pub const END_OF_TURN: &str = "<|end|>";
/// Start of a system turn.
pub const SYSTEM: &str = "<|system|>";
/// Start of a user turn.
pub const USER: &str = "<|user|>";
/// Start of an assistant turn.
pub const ASSISTANT: &str = "<|assistant|>";
/// Start of a tool-result turn.
pub const TOOL: &str = "<|tool|>";
/// Start of a tool call inside an assistant turn.
pub const TOOL_CALL: &str = "<|tool_call|>";

/// All special tokens; a token's index here is its id.
pub const SPECIAL_TOKENS: [&str; 8] = [
    PAD,
    END_OF_TEXT,
    END_OF_TURN,
    SYSTEM,
    USER,
    ASSISTANT,
    TOOL,
    TOOL_CALL,
];

/// The fixed id of a special token, if `token` is one.
pub fn id_of(token: &str) -> Option<u32> {
    SPECIAL_TOKENS
        .iter()
        .position(|special| *special == token)
        .map(|index| index as u32)
}
