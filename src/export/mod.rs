//! Turning a checkpoint into the files other tools run: [`gguf`] writes llama.cpp's
//! GGUF format (f32, f16 or q8_0) for the llama and qwen2 families. The `export` stage
//! calls it alongside the Hugging Face layout it writes itself.

pub mod gguf;
