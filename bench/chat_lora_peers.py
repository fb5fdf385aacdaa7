"""pipelines/chat-lora.yaml checked against its peers: Hugging Face PEFT + transformers, and
llama.cpp (through llama-cpp-python) + gguf-py. Driven by bench/chat_lora_peers.sh, which
runs the pipeline and calls this file twice, in two virtual environments:

    python chat_lora_peers.py hf    --repo R --outputs RUN/outputs --f32-export DIR --trainyard BIN --work W
    python chat_lora_peers.py llama --work W --gguf-dir RUN/outputs/export --f32-gguf-dir DIR

`hf` (torch, transformers, peft) checks

- cache: trainyard's chat-cache ids of every training conversation equal transformers'
  `apply_chat_template` of the same conversation (the template has no generation blocks,
  so the mask is checked generically: exactly the assistant turns' content + <|im_end|>);
- merge: every merged weight equals bf16(W + alpha/r * B @ A) computed by torch in f32, and
  tables with trainable token rows (add_tokens) equal PEFT's index_copy of those rows
  (max difference in bf16 ulps);
- peft: tests/fixtures/peft/generate.py (PeftModel.from_pretrained on the original base vs
  the merged export loaded by transformers) on the ids of a few training conversations,
  plus how far the adapter moves the base's logits (so the check is not vacuous) and the
  bf16 export against its f32 widening;
- greedy: `trainyard generate` (its own forward pass, on the merged export) against
  transformers' greedy decoding of the same prompt — trainyard has no logits CLI and
  `generate` does not take an adapter directory, so base + adapter is not compared directly;

and writes the reference for llama.cpp: for a few conversations with and without tools,
transformers' rendered text (add_generation_prompt=True), ids and logits of the export.

`llama` (llama-cpp-python, gguf) checks, on model-f16.gguf (and model-f32.gguf of the f32
export when given): the GGUF's tokenizer.chat_template (read with gguf-py) renders through
llama-cpp-python's Jinja2ChatFormatter exactly transformers' text; llama.cpp's tokenizer
gives transformers' ids (special tokens parsed, nothing prepended); EOS/EOT are <|im_end|>
and <|im_end|>/<|endoftext|> end generation; logits match transformers' within a fraction
of the logit scale and the greedy next token agrees at most positions.

Each mode prints one line per check and `PASS`/`FAIL`, and exits 1 if any check failed.
"""

import argparse
import difflib
import json
import os
import pathlib
import subprocess
import sys

RESULTS = []


def note(name, detail):
    print(f"NOTE  {name:26} {detail}", flush=True)


def result(name, ok, detail):
    RESULTS.append((name, bool(ok)))
    print(f"{'PASS' if ok else 'FAIL'}  {name:26} {detail}", flush=True)


def text_diff(a, b, label_a, label_b):
    lines = difflib.unified_diff(a.splitlines(keepends=True), b.splitlines(keepends=True),
                                 label_a, label_b, n=1)
    return "".join(repr(line)[1:-1] + "\n" if not line.startswith(("---", "+++", "@@")) else line
                   for line in lines)


# Conversations for the template and logits checks (beyond those read from the training set).
TOOLS = [
    {"type": "function", "function": {
        "name": "get_forecast",
        "description": "The weather forecast for an island.",
        "parameters": {"type": "object",
                       "properties": {"island": {"type": "string", "description": "Island name"},
                                      "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                       "required": ["island"]}}},
    {"type": "function", "function": {
        "name": "book_ferry",
        "description": "Books a ferry crossing — returns a ticket id.",
        "parameters": {"type": "object",
                       "properties": {"from": {"type": "string"}, "to": {"type": "string"},
                                      "date": {"type": "string", "format": "date"}},
                       "required": ["from", "to"]}}},
]


def extra_cases():
    return [
        {"name": "user only (default system)", "tools": None,
         "messages": [{"role": "user", "content": "Which birds nest on Ithen?"}]},
        {"name": "tools, no system", "tools": TOOLS,
         "messages": [{"role": "user", "content": "Will it rain on Varro in 2 days?"}]},
        {"name": "tools + system + call history", "tools": TOOLS,
         "messages": [
             {"role": "system", "content": "You book ferries between the islands."},
             {"role": "user", "content": "Book me Maren → Tolvey on 2025-06-01, please."},
             {"role": "assistant", "content": "", "tool_calls": [
                 {"id": "call_9", "type": "function",
                  "function": {"name": "book_ferry",
                               "arguments": {"from": "Maren", "to": "Tolvey", "date": "2025-06-01"}}}]},
             {"role": "tool", "tool_call_id": "call_9", "content": "{\"ticket\": \"MT-118\"}"},
             {"role": "assistant", "content": "Booked: ticket MT-118."},
             {"role": "user", "content": "Thanks! And the weather there?"}]},
    ]


# ---------------------------------------------------------------------------- hf mode


def hf_mode(args):
    import numpy as np
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(args.repo / "tests/fixtures/peft"))
    import generate as peft_check  # tests/fixtures/peft/generate.py

    out = args.outputs
    base_dir = args.repo / "data/models/tiny-qwen2"
    export_dir = out / "export"
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(export_dir)
    conversations = [json.loads(line) for line in (out / "chats/train.jsonl").read_text().splitlines()]

    def render_ids(conv, add_generation_prompt=False):
        return tok.apply_chat_template(conv["messages"], tools=conv.get("tools"), tokenize=True,
                                       add_generation_prompt=add_generation_prompt, return_dict=False)

    # -- cache: trainyard's rendering of every training conversation vs transformers'.
    cache = out / "chat-cache/train"
    offsets = np.fromfile(cache / "offsets.bin", dtype="<u8")
    tokens = np.fromfile(cache / "tokens.bin", dtype="<u2")
    mask = np.fromfile(cache / "mask.bin", dtype="u1")
    im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    n = len(offsets) - 1
    ids_equal = masks_equal = 0
    first_bad = None
    for i, conv in enumerate(conversations[:n]):
        ours = tokens[offsets[i]:offsets[i + 1]].tolist()
        theirs = render_ids(conv)
        if ours == theirs:
            ids_equal += 1
        elif first_bad is None:
            first_bad = (i, ours, theirs)
        # Expected mask: inside each `<|im_start|>assistant\n … <|im_end|>`, everything after
        # the header up to and including <|im_end|> (the "\n" after it is not trained).
        expected = [0] * len(theirs)
        header = tok("assistant\n", add_special_tokens=False)["input_ids"]
        j = 0
        while j < len(theirs):
            if theirs[j] == im_start and theirs[j + 1:j + 1 + len(header)] == header:
                k = j + 1 + len(header)
                while k < len(theirs) and theirs[k] != im_end:
                    expected[k] = 1
                    k += 1
                if k < len(theirs):
                    expected[k] = 1
                j = k
            j += 1
        if mask[offsets[i]:offsets[i + 1]].tolist() == expected:
            masks_equal += 1
    detail = f"ids equal apply_chat_template for {ids_equal}/{n} training conversations, " \
             f"mask = assistant content + <|im_end|> for {masks_equal}/{n}"
    if len(conversations) != n:
        detail += f" (train.jsonl has {len(conversations)} conversations, the cache {n})"
    if first_bad:
        i, ours, theirs = first_bad
        at = next((p for p, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        detail += f"\n      first difference: conversation {i} at token {at}: trainyard " \
                  f"{ours[max(0, at - 3):at + 5]} {tok.decode(ours[at:at + 8])!r}, transformers " \
                  f"{theirs[max(0, at - 3):at + 5]} {tok.decode(theirs[at:at + 8])!r}"
    result("cache ids/mask (train)", ids_equal == n == len(conversations) and masks_equal == n, detail)

    # -- merge: merged weights vs bf16(W + alpha/r B A) computed here.
    adapter_cfg = json.loads((out / "adapter/adapter_config.json").read_text())
    scale = adapter_cfg["lora_alpha"] / adapter_cfg["r"]

    def tensors(directory):
        found = {}
        for file in sorted(directory.glob("*.safetensors")):
            with safe_open(file, "pt") as f:
                for key in f.keys():
                    found[key] = f.get_tensor(key)
        return found

    base_w, merged_w, lora = tensors(base_dir), tensors(out / "merge"), tensors(out / "adapter")
    worst_ulp, changed, n_lora, n_rows, bad_names = 0, 0, 0, 0, []
    for name, w in base_w.items():
        if name not in merged_w:
            bad_names.append(f"missing {name}")
            continue
        stem = name[:-len(".weight")]
        a_key = f"base_model.model.{stem}.lora_A.weight"
        b_key = f"base_model.model.{stem}.lora_B.weight"
        rows_key = f"base_model.model.{stem}.token_adapter.trainable_tokens_delta"
        if a_key in lora:
            n_lora += 1
            expected = (w.float() + scale * (lora[b_key].float() @ lora[a_key].float())).to(w.dtype)
        elif rows_key in lora:
            # add_tokens: PEFT's trainable_token_indices rows replace (or extend) the table.
            ids = adapter_cfg["trainable_token_indices"][stem.split(".")[-1]]
            vocab = max(w.shape[0], max(ids) + 1)
            grown = torch.cat([w.float(), w.float().mean(0, keepdim=True).expand(vocab - w.shape[0], -1)])
            expected = grown.index_copy(0, torch.tensor(ids), lora[rows_key].float()).to(w.dtype)
            n_rows += 1
            w = expected if vocab > w.shape[0] else w
        else:
            expected = w
        got = merged_w[name]
        if got.dtype != w.dtype or got.shape != w.shape:
            bad_names.append(f"{name}: {got.dtype}{tuple(got.shape)} vs {w.dtype}{tuple(w.shape)}")
            continue
        ulp = (got.view(torch.int16).int() - expected.view(torch.int16).int()).abs().max().item()
        worst_ulp = max(worst_ulp, ulp)
        changed += int(got.shape != base_w[name].shape or not torch.equal(got, base_w[name]))
    lora_keys = {k for k in lora if ".lora_" in k}
    result("merge = bf16(W + a/r*BA)", not bad_names and worst_ulp <= 1 and n_lora * 2 == len(lora_keys),
           f"{n_lora} LoRA'd matrices (of {len(lora_keys)} adapter tensors), {n_rows} tables with trained "
           f"token rows {adapter_cfg.get('trainable_token_indices')}, {changed} weights changed "
           f"by the merge, max difference {worst_ulp} bf16 ulp{'; ' + '; '.join(bad_names[:4]) if bad_names else ''}")

    # -- peft: tests/fixtures/peft/generate.py on a few training conversations.
    picks = [i for i, c in enumerate(conversations) if not any("tool_calls" in m for m in c["messages"])][:3]
    picks += [i for i, c in enumerate(conversations) if any("tool_calls" in m for m in c["messages"])][:2]
    ids = [render_ids(conversations[i]) for i in picks]
    (work / "ids.json").write_text(json.dumps({"input_ids": ids}))
    command = [sys.executable, str(args.repo / "tests/fixtures/peft/generate.py"), "--base", str(base_dir),
               "--adapter", str(out / "adapter"), "--merged", str(export_dir), "--ids", str(work / "ids.json")]
    run = subprocess.run(command, capture_output=True, text=True)
    report = next((json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")), {})
    agree, total = map(int, report.get("argmax_agreement", "0/1").split("/"))
    result("PEFT adapter vs merged", run.returncode == 0 and agree == total,
           f"generate.py exit {run.returncode}: max|dlogit| {report.get('max_abs_diff', float('nan')):.3e} of "
           f"max|logit| {report.get('max_abs_logit', float('nan')):.3f} = {report.get('relative', float('nan')):.2e} "
           f"(tol {report.get('tolerance')}, merged {report.get('merged_dtype')}), argmax {agree}/{total} "
           f"on {len(ids)} training conversations {picks} ({sum(map(len, ids))} tokens)"
           + ("" if report else f"\n{run.stdout}\n{run.stderr}"))
    for line in run.stderr.splitlines():
        if "missing" in line.lower() or "unexpected" in line.lower() or "error" in line.lower():
            print(f"      generate.py: {line}")

    # The adapter must move the logits by much more than that tolerance, or the check says nothing.
    with_adapter = peft_check.peft_model(base_dir, out / "adapter")
    bare = peft_check.load(base_dir)
    merged = peft_check.load(export_dir)
    effect = peft_gap = scale_max = 0.0
    flips = 0
    for row in ids:
        x = torch.tensor([row])
        with torch.no_grad():
            a, b, m = with_adapter(input_ids=x).logits, bare(input_ids=x).logits, merged(input_ids=x).logits
        effect = max(effect, (a - b).abs().max().item())
        peft_gap = max(peft_gap, (a - m).abs().max().item())
        scale_max = max(scale_max, a.abs().max().item())
        flips += (a.argmax(-1) != b.argmax(-1)).sum().item()
    result("adapter effect (non-vacuous)", effect > 5 * peft_gap,
           f"PEFT(base+adapter) vs bare base: max|dlogit| {effect:.3e} ({effect / scale_max:.2e} of the scale, "
           f"{flips} argmax changed) vs PEFT vs merged {peft_gap:.3e}: ratio {effect / max(peft_gap, 1e-30):.1f}")

    # The f32 export (dtype=f32) is the bf16 merge widened: same logits, bitwise.
    if args.f32_export:
        f32 = peft_check.load(args.f32_export)
        same = all(torch.equal(f32(input_ids=torch.tensor([r])).logits, merged(input_ids=torch.tensor([r])).logits)
                   for r in ids)
        dtype = peft_check.stored_dtype(args.f32_export)
        result("f32 export = bf16 widened", same and dtype == "float32",
               f"export dtype=f32 stores {dtype}; logits {'bitwise equal to' if same else 'differ from'} the bf16 export's")

    # Keys of the base's config.json that the export does not carry (informational).
    base_cfg = json.loads((base_dir / "config.json").read_text())
    export_cfg = json.loads((export_dir / "config.json").read_text())
    dropped = {k: v for k, v in base_cfg.items() if k not in export_cfg}
    changed_keys = {k: (v, export_cfg[k]) for k, v in base_cfg.items() if k in export_cfg and export_cfg[k] != v}
    note("export config.json", f"keys of the base's config.json missing from the export's: {json.dumps(dropped)}"
         + (f"; changed: {changed_keys}" if changed_keys else ""))

    # -- greedy: trainyard's own forward (generate) vs transformers on the merged export.
    eos = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    prompts = [("chat", "Which birds nest on Ithen?"), ("chat", "What's the weather on Varro tomorrow?"),
               ("raw", "The ferry to Maren runs")]
    same = 0
    lines, samples = [], []
    for kind, prompt in prompts:
        if kind == "chat":
            p_ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        else:
            p_ids = tok(prompt)["input_ids"]
        with torch.no_grad():
            gen = merged.generate(torch.tensor([p_ids]), max_new_tokens=16, do_sample=False, eos_token_id=eos,
                                  pad_token_id=eos[1], repetition_penalty=1.0, top_k=None, top_p=None,
                                  temperature=None)[0, len(p_ids):].tolist()
        while gen and gen[-1] in eos:
            gen = gen[:-1]
        hf_text = tok.decode(gen, skip_special_tokens=False)
        cmd = [str(args.trainyard), "generate", str(export_dir), "--prompt", prompt, "--temperature", "0",
               "--max-new-tokens", "16"] + (["--raw"] if kind == "raw" else [])
        ty = subprocess.run(cmd, capture_output=True, text=True)
        ty_text = ty.stdout[:-1] if ty.stdout.endswith("\n") else ty.stdout
        ok = ty.returncode == 0 and ty_text == hf_text
        same += ok
        samples.append(f"{kind} {prompt!r} → {ty_text!r}")
        if not ok:
            lines.append(f"      {kind} {prompt!r}: trainyard {ty_text!r} (exit {ty.returncode} {ty.stderr.strip()[:200]}), "
                         f"transformers {hf_text!r}")
    result("greedy: trainyard vs HF", same == len(prompts),
           f"{same}/{len(prompts)} prompts give the same 16-token greedy text (merged export, bf16)"
           + ("\n" + "\n".join(lines) if lines else "") + "\n      trainyard: " + "\n      trainyard: ".join(samples))

    # -- reference for llama.cpp.
    cases = []
    for i in picks[:1] + picks[3:4]:
        cases.append({"name": f"training conversation {i}", "tools": conversations[i].get("tools"),
                      "messages": conversations[i]["messages"]})
    cases += extra_cases()
    logits = {}
    for c, case in enumerate(cases):
        case["text"] = tok.apply_chat_template(case["messages"], tools=case["tools"], tokenize=False,
                                               add_generation_prompt=True)
        case["ids"] = tok.apply_chat_template(case["messages"], tools=case["tools"], tokenize=True,
                                              add_generation_prompt=True, return_dict=False)
        case["ids_of_text"] = tok(case["text"], add_special_tokens=False)["input_ids"]
        case["ids_of_text_default"] = tok(case["text"])["input_ids"]  # what the tokenizer itself adds
        with torch.no_grad():
            logits[f"case{c}"] = merged(input_ids=torch.tensor([case["ids"]])).logits[0].float().numpy()
    np.savez(work / "reference.npz", **logits)
    reference = {
        "cases": cases,
        "template": json.loads((export_dir / "tokenizer_config.json").read_text()).get("chat_template"),
        "eos_token": tok.eos_token, "eos_token_id": tok.eos_token_id,
        "bos_token": tok.bos_token,
        "generation_eos": json.loads((export_dir / "generation_config.json").read_text()).get("eos_token_id"),
        "special": {t: tok.convert_tokens_to_ids(t) for t in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]},
    }
    (work / "reference.json").write_text(json.dumps(reference, ensure_ascii=False, indent=1))
    return summary("hf")


# ---------------------------------------------------------------------------- llama mode


def llama_mode(args):
    import numpy as np

    import gguf
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    work = args.work
    reference = json.loads((work / "reference.json").read_text())
    ref_logits = np.load(work / "reference.npz")
    cases = reference["cases"]
    special = reference["special"]
    files = [(args.gguf_dir / "model-f16.gguf", "f16")]
    if args.f32_gguf_dir:
        files.append((args.f32_gguf_dir / "model-f32.gguf", "f32"))
        files.append((args.f32_gguf_dir / "model-f16.gguf", "f16 (f32 export)"))

    for path, dtype in files:
        reader = gguf.GGUFReader(str(path))

        def field(key, reader=reader):
            return reader.fields[key].contents() if key in reader.fields else None

        template = field("tokenizer.chat_template")
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_batch=512, n_threads=2, logits_all=True,
                              type_k=0, type_v=0, flash_attn=False, verbose=False)
        vocab = llm._model.vocab
        if dtype == "f16":
            meta = {k: field(k) for k in ["general.architecture", "tokenizer.ggml.model", "tokenizer.ggml.pre",
                                          "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                                          "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
                                          "general.file_type"]}
            print(f"      {path.name}: {json.dumps(meta)}; {len(reader.tensors)} tensors")
            # Template: the string itself, then what it renders.
            same_string = template == reference["template"]
            rendered_ok = 0
            diffs = []
            for case in cases:
                formatter = Jinja2ChatFormatter(template=template or "", eos_token=reference["eos_token"],
                                                bos_token=reference["bos_token"] or "", add_generation_prompt=True)
                try:
                    text = formatter(messages=case["messages"], tools=case["tools"]).prompt
                except Exception as error:  # noqa: BLE001 - reported as a failure
                    text = f"<render error: {error!r}>"
                if text == case["text"]:
                    rendered_ok += 1
                else:
                    diffs.append(f"      {case['name']}:\n" + text_diff(case["text"], text, "transformers", "llama.cpp/GGUF"))
            result("GGUF chat template", template is not None and rendered_ok == len(cases),
                   f"GGUF template {'==' if same_string else '!='} tokenizer_config's ({len(template or '')} chars); "
                   f"Jinja2ChatFormatter renders transformers' text for {rendered_ok}/{len(cases)} conversations "
                   f"({sum(1 for c in cases if c['tools'])} with tools, add_generation_prompt=True: "
                   f"{'; '.join(c['name'] for c in cases)})"
                   + ("\n" + "".join(diffs) if diffs else ""))

            # Tokenizer.
            tok_ok = 0
            lines = []
            for case in cases:
                got = llm.tokenize(case["text"].encode(), add_bos=False, special=True)
                also = llm.tokenize(case["text"].encode(), add_bos=True, special=True)  # add_bos honours the vocab
                ok = got == case["ids"] == case["ids_of_text"] and also == case["ids_of_text_default"]
                tok_ok += ok
                if not ok:
                    at = next((p for p, (a, b) in enumerate(zip(got, case["ids"])) if a != b), min(len(got), len(case["ids"])))
                    lines.append(f"      {case['name']}: at {at}: llama.cpp {got[max(0, at - 3):at + 6]} "
                                 f"(with add_bos {also[:4]}…), transformers {case['ids'][max(0, at - 3):at + 6]} "
                                 f"(tokenizer() default {case['ids_of_text_default'][:4]}…); lengths {len(got)} vs {len(case['ids'])}")
            result("llama.cpp tokenizer", tok_ok == len(cases),
                   f"ids equal transformers' for {tok_ok}/{len(cases)} rendered conversations "
                   f"({sum(len(c['ids']) for c in cases)} tokens; special tokens parsed; add_bos "
                   f"{bool(llama_cpp.llama_vocab_get_add_bos(vocab))})" + ("\n" + "\n".join(lines) if lines else ""))

            # EOS / EOT / end of generation.
            def piece(i):
                return llm.detokenize([i], special=True).decode(errors="replace") if i >= 0 else None

            eos, eot = llm.token_eos(), llama_cpp.llama_vocab_eot(vocab)
            eog = {t: bool(llama_cpp.llama_vocab_is_eog(vocab, i)) for t, i in special.items()}
            expected_eog = {reference["eos_token"]: True, "<|endoftext|>": True, "<|im_start|>": False}
            ok = (eos == special["<|im_end|>"] and eot == special["<|im_end|>"] and eog == expected_eog)
            # What llama.cpp's own converter (gguf-py SpecialVocab, as convert_hf_to_gguf.py uses it)
            # takes from the export directory and from the original base directory.
            gguf_ids = {t: field(f"tokenizer.ggml.{key}_token_id")
                        for t, key in [("bos", "bos"), ("eos", "eos"), ("pad", "padding")]}
            gguf_ids = {k: v for k, v in gguf_ids.items() if v is not None}
            for label, directory in [("export dir", path.parent), ("base dir", args.base)]:
                if directory is None:
                    continue
                converter = gguf.SpecialVocab(directory, load_merges=False, n_vocab=llm.n_vocab())
                same = converter.special_token_ids == gguf_ids
                (note if not same else lambda n, d: print(f"OK    {n:26} {d}"))(
                    f"special ids vs {label}",
                    f"GGUF {gguf_ids}; gguf-py SpecialVocab of the {label} {converter.special_token_ids}"
                    + ("" if same else f" (llama.cpp's default bos without one: {llm.token_bos()} {piece(llm.token_bos())!r})"))
            result("EOS/EOT", ok,
                   f"eos {eos} {piece(eos)!r}, eot {eot} {piece(eot)!r}, bos {llm.token_bos()}; end generation: {eog} "
                   f"(transformers eos {reference['eos_token_id']} {reference['eos_token']!r}, "
                   f"generation_config eos {reference['generation_eos']})")

        # Logits.
        worst_rel, worst_abs, agree, total, scale = 0.0, 0.0, 0, 0, 0.0
        per_case = []
        for c, case in enumerate(cases):
            ours = ref_logits[f"case{c}"]
            llm.reset()
            llm.eval(case["ids"])
            theirs = np.array(llm.scores[: len(case["ids"])], dtype=np.float32)
            if theirs.shape != ours.shape:
                result(f"logits {dtype}", False, f"{case['name']}: llama.cpp shape {theirs.shape}, transformers {ours.shape}")
                break
            gap = float(np.abs(theirs - ours).max())
            s = float(np.abs(ours).max())
            worst_abs, scale = max(worst_abs, gap), max(scale, s)
            worst_rel = max(worst_rel, gap / s)
            a = int((theirs.argmax(1) == ours.argmax(1)).sum())
            agree += a
            total += len(case["ids"])
            per_case.append(f"{gap:.2e}")
        else:
            tolerance = 1e-4 if dtype == "f32" else 1e-2
            result(f"logits {dtype}", worst_rel <= tolerance and agree >= 0.95 * total,
                   f"{path.parent.name}/{path.name}: max|dlogit| {worst_abs:.3e} of max|logit| {scale:.3f} = "
                   f"{worst_rel:.2e} relative (tol {tolerance:g}; per conversation {', '.join(per_case)}); "
                   f"greedy next token agrees at {agree}/{total} positions")
        llm.close() if hasattr(llm, "close") else None
    from importlib.metadata import version
    print(f"      llama-cpp-python {llama_cpp.__version__}, gguf {version('gguf')}")
    return summary("llama")


def summary(mode):
    failed = [name for name, ok in RESULTS if not ok]
    print(f"{mode}: {len(RESULTS) - len(failed)}/{len(RESULTS)} checks passed" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["hf", "llama"])
    parser.add_argument("--repo", type=pathlib.Path, default=pathlib.Path(__file__).resolve().parent.parent)
    parser.add_argument("--outputs", type=pathlib.Path, help="runs/latest/outputs of the default (bf16) run")
    parser.add_argument("--f32-export", type=pathlib.Path, help="the export of the dtype=f32 run")
    parser.add_argument("--trainyard", type=pathlib.Path)
    parser.add_argument("--work", type=pathlib.Path, required=True)
    parser.add_argument("--gguf-dir", type=pathlib.Path)
    parser.add_argument("--f32-gguf-dir", type=pathlib.Path)
    parser.add_argument("--base", type=pathlib.Path, help="the original base directory (for gguf-py's SpecialVocab)")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return hf_mode(args) if args.mode == "hf" else llama_mode(args)


if __name__ == "__main__":
    sys.exit(main())
