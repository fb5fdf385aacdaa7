//! Turning a checkpoint into the files other tools run: [`gguf`] writes llama.cpp's
//! GGUF format (f32, f16 or q8_0) for the llama, qwen2 and gpt2 families, for the
//! `export` stage to write beside the Hugging Face layout.

pub mod gguf;
