//! The training stages: pretrain, SFT and LoRA.
//!
//! One test binary per area keeps linking (and CI's disk) small; each module was
//! once its own `tests/<name>.rs`.

#[path = "../common/mod.rs"]
mod common;

mod lora;
mod pretrain;
mod sft;
