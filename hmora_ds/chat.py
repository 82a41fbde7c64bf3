"""``hmora-ds chat``: talk to a model with its adapter in the terminal, answers streamed.

    hmora-ds chat --model smollm2-135m-instruct --adapter runs/default/adapter_best
    hmora-ds chat --model Qwen/Qwen2-1.5B-Instruct --adapter DIR --system "Be brief." --routing

Commands inside the chat: ``/reset`` (forget the conversation), ``/routing`` (toggle the
per-layer expert choices), ``/exit`` (or Ctrl-D). Input can also be piped, one message per line.
Routing follows training: see :mod:`hmora_ds.inference`.
"""

from __future__ import annotations

import sys

from hmora_ds.cli import Parser, configure_logging, prog_name


def add_model_arguments(p: Parser) -> None:
    """The options that choose the model, shared by ``chat`` and ``generate``."""
    p.add_argument("--model", required=True, help="HF name / dir, .gguf, or smollm2-135m-instruct")
    p.add_argument("--adapter", default=None, help="adapter directory (none: the base model)")
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: the model's)")
    p.add_argument("--gguf-file", default=None, help="GGUF file inside --model's directory")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    p.add_argument("--device", default="auto", help="auto (a GPU if any), cpu, cuda, cuda:1 …")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (temperature > 0)")
    p.add_argument("--max-input-tokens", type=int, default=2048, help="prompt limit")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument(
        "--chat-template",
        default=None,
        help="chatml, llama3, plain or a .jinja file: the run's data.chat_template, if it set one "
        "(default: the tokenizer's own)",
    )


def check_numbers(args) -> None:
    """Raises ValueError naming the option for an impossible decoding setting."""
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
    if args.max_input_tokens < 1:
        raise ValueError(f"--max-input-tokens: must be >= 1, got {args.max_input_tokens}")
    if args.temperature < 0:
        raise ValueError(f"--temperature: must be >= 0 (0 = greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p: must lie in (0, 1], got {args.top_p}")


def build_generator(args):
    """Load the model named by ``args`` and wrap it for generation."""
    from hmora_ds.inference import GenerationConfig, Generator, load_for_inference

    tok, model = load_for_inference(
        args.model,
        args.adapter,
        tokenizer=args.tokenizer,
        gguf_file=args.gguf_file,
        dtype=args.dtype,
        device=args.device,
        chat_template=args.chat_template,
    )
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        max_input_tokens=args.max_input_tokens,
    )
    return Generator(tok, model, config)


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog=prog_name("hmora_ds.chat"), description=__doc__.split("\n")[0])
    add_model_arguments(p)
    p.add_argument("--routing", action="store_true", help="print each layer's expert choices")
    args = p.parse_args(argv)
    try:
        check_numbers(args)
        gen = build_generator(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from transformers import TextStreamer

    interactive = sys.stdin.isatty()
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    show_routing = args.routing
    if interactive:
        print("chat: /reset forgets the conversation, /routing toggles expert choices, /exit")
    while True:
        try:
            line = input("you> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = []
            print("(conversation reset)")
            continue
        if text == "/routing":
            show_routing = not show_routing
            print(f"(routing {'on' if show_routing else 'off'})")
            continue
        history.append({"role": "user", "content": text})
        messages = [*system, *history]
        try:
            if show_routing:
                for row in gen.routing(messages) or ["(no routers: base model or plain LoRA)"]:
                    print(f"  {row}")
            print("assistant> ", end="", flush=True)
            streamer = TextStreamer(gen.tokenizer, skip_prompt=True, skip_special_tokens=True)
            answer = gen.answer(messages, streamer=streamer)
        except ValueError as err:
            history.pop()
            print(f"error: {err}", file=sys.stderr)
            continue
        history.append({"role": "assistant", "content": answer})


if __name__ == "__main__":
    configure_logging()
    sys.exit(main())
