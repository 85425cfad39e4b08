"""
Chat with a trained model in the terminal, replies streamed as they are generated.

python -m scripts.chat_cli -i sft                     # interactive, multi-turn
python -m scripts.chat_cli -i sft -p "Why is the sky blue?"   # answer once and exit (scriptable)
python -m scripts.chat_cli -i base --model-tag d20 --step 5000 --temperature 0 --max-tokens 100

In the interactive chat: `clear` (or /clear) starts a new conversation, `quit` / `exit` (or /quit, /exit)
leaves; Ctrl-C during a reply stops the reply and keeps the session, Ctrl-C or Ctrl-D at the prompt leaves.
The conversation is kept as tokens, so calculator calls and their outputs stay in it exactly as generated.
"""
import signal
import threading

import torch

from nanochat.common import autocast_context, get_compute_dtype, make_parser, non_negative_float, non_negative_int, positive_int
from nanochat.tokenizer import StreamDecoder

from ._cli import add_model_source_flags, device_type_or_exit, load_model_or_exit


def get_parser():
    p = make_parser(__doc__)
    add_model_source_flags(p)
    p.add_argument("-p", "--prompt", default=None, help="answer this one message and exit")
    p.add_argument("-t", "--temperature", type=non_negative_float, default=0.6, help="sampling temperature; 0 = greedy")
    p.add_argument("-k", "--top-k", type=non_negative_int, default=50, help="sample among the k likeliest tokens; 0 = off")
    p.add_argument("-m", "--max-tokens", type=positive_int, default=512, help="reply length limit in tokens")
    p.add_argument("--seed", type=int, default=42, help="sampling seed (reply n uses seed + n)")
    return p


class Chat:
    """A conversation as token ids: <|bos|> then user / assistant turns, rendered like
    Tokenizer.render_conversation renders them."""

    def __init__(self, engine, tokenizer, device_type, args):
        self.engine, self.tokenizer, self.device_type, self.args = engine, tokenizer, device_type, args
        s = tokenizer.encode_special
        self.user_start, self.user_end = s("<|user_start|>"), s("<|user_end|>")
        self.assistant_start, self.assistant_end = s("<|assistant_start|>"), s("<|assistant_end|>")
        self.replies = 0
        self.clear()

    def clear(self):
        self.tokens = [self.tokenizer.get_bos_token_id()]

    def reply(self, text):
        """Stream the assistant's reply to `text`; returns it. Ctrl-C stops the reply early (the part
        generated so far stays in the conversation) and is not raised further."""
        self.tokens += [self.user_start, *self.tokenizer.encode(text), self.user_end, self.assistant_start]
        context = self.engine.model.config.sequence_len
        if len(self.tokens) >= context:
            print(f"[note: the conversation is {len(self.tokens)} tokens, beyond the model's {context}-token "
                  "context; replies degrade; `clear` starts over]", flush=True)
        a = self.args
        decoder, generated = StreamDecoder(self.tokenizer), []
        gen = self.engine.generate(self.tokens, num_samples=1, max_tokens=a.max_tokens, temperature=a.temperature,
                                   top_k=a.top_k or None, seed=a.seed + self.replies)
        self.replies += 1
        # Ctrl-C sets a flag the loop reads at each token, rather than raising KeyboardInterrupt wherever the
        # interpreter happens to be: raised inside a finalizer (a freed tensor's, the generator's) Python prints
        # "Exception ignored" and drops it, and the reply would run on to --max-tokens
        # Only over Python's own Ctrl-C handler: signal handlers live in the main thread, and a SIGINT the shell
        # ignores (a background job, nohup) stays ignored
        interrupt = threading.Event()
        ours = (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
        previous = signal.signal(signal.SIGINT, lambda *_: interrupt.set()) if ours else None
        try:
            # one autocast around the whole reply: the weights' casts are cached across tokens
            with autocast_context(self.device_type, get_compute_dtype(self.device_type)):
                for column, _ in gen:
                    if interrupt.is_set() or column[0] in self.engine.stop_tokens:
                        break
                    generated.append(column[0])
                    print(decoder.push(column[0]), end="", flush=True)
        except KeyboardInterrupt:  # a handler other than ours (not the main thread)
            interrupt.set()
        finally:
            if ours:
                signal.signal(signal.SIGINT, previous)
            gen.close()  # frees the KV cache now
        print(decoder.flush() + (" [stopped]" if interrupt.is_set() else ""), flush=True)
        self.tokens += generated + [self.assistant_end]
        return self.tokenizer.decode(generated)


def interactive(chat):
    print("nanochat: type a message; `clear` starts over, `quit` (or Ctrl-D) leaves, Ctrl-C stops a reply.", flush=True)
    while True:
        try:
            text = input("\nUser: ").strip()
        except (EOFError, KeyboardInterrupt):  # Ctrl-D / Ctrl-C at the prompt: leave
            print(flush=True)
            return
        if text.lower() in ("quit", "exit", "/quit", "/exit"):
            return
        if text.lower() in ("clear", "/clear"):
            chat.clear()
            print("(conversation cleared)", flush=True)
        elif text:
            print("\nAssistant: ", end="", flush=True)
            chat.reply(text)


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.prompt is not None and not args.prompt.strip():
        parser.error("-p/--prompt is empty")
    device_type = device_type_or_exit(parser, args)
    from nanochat.engine import Engine
    model, tokenizer, _, _ = load_model_or_exit("chat_cli", args, torch.device(device_type))
    chat = Chat(Engine(model, tokenizer, compile=args.compile), tokenizer, device_type, args)
    if args.prompt is not None:
        chat.reply(args.prompt)
    else:
        interactive(chat)


if __name__ == "__main__":
    main()
