"""`magi chat`: one prompt, or a conversation with line editing, history and slash commands.

Interactive input goes through GNU readline when stdin is a terminal (arrow keys, Ctrl-R, history kept
in `$MAGI_HOME/chat_history`); piped input is read line by line, so a script can drive a conversation.
Lines starting with `/` are commands and never reach the model, nor do a bare `quit` or `exit`.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path
from typing import Awaitable, Callable

from protos.infer import ChatMessage, GenerateReply, GenerateRequest, StreamChunk
from shared import bus
from shared.errors import MagiError

HISTORY_LENGTH = 1000
HELP = """commands:
  /status   services answering on the bus
  /models   models and their replicas
  /reset    forget this conversation (start a new one)
  /help     this list
  /quit     leave (also /exit, quit, exit or Ctrl-D); Ctrl-C stops an answer"""

Connect = Callable[[], Awaitable]


async def stream_answer(connect: Connect, request: GenerateRequest, out=sys.stdout) -> GenerateReply:
    """Print the answer as its tokens arrive; return the final reply (with usage and replica)."""
    nc = await connect()
    try:
        stream = bus.stream_request(nc, "magi.infer.generate", request, StreamChunk, GenerateReply, timeout=120)
        async with contextlib.aclosing(stream):
            async for item in stream:
                if isinstance(item, StreamChunk):
                    print(item.text, end="", flush=True, file=out)
                else:
                    print(file=out)
                    return item
    finally:
        await nc.close()
    raise MagiError("the stream ended without a final reply")


def _footer(reply: GenerateReply) -> None:
    print(f"  [{reply.replica} on {reply.node}, {reply.usage.completion_tokens} tokens, {reply.latency_ms:.0f} ms]",
          file=sys.stderr)


class Chat:
    """One conversation: the messages so far and the settings each turn's request carries."""

    def __init__(self, connect: Connect, *, model: str, role: str, max_tokens: int) -> None:
        self.connect = connect
        self.model, self.role, self.max_tokens = model, role, max_tokens
        self.history: list[ChatMessage] = []

    def turn(self, text: str) -> GenerateReply:
        """Send `text` with the conversation so far; the user's line is kept only if an answer came."""
        messages = [*self.history, ChatMessage(role="user", content=text)]
        request = GenerateRequest(model=self.model, role=self.role, messages=messages, max_tokens=self.max_tokens,
                                  stream=True)
        reply = asyncio.run(stream_answer(self.connect, request))
        self.history = [*messages, ChatMessage(role="assistant", content=reply.text)]
        _footer(reply)
        return reply


def _readline(history_file: Path):
    """GNU readline with the history file loaded, or None (not a terminal, or no readline here)."""
    if not sys.stdin.isatty():
        return None
    try:
        import readline
    except ImportError:
        return None
    readline.set_history_length(HISTORY_LENGTH)
    with contextlib.suppress(OSError):
        readline.read_history_file(history_file)
    return readline


def interactive(chat: Chat, commands: dict[str, Callable[[], None]], history_file: Path) -> int:
    """The read-answer loop. `commands`: `/name` -> what it prints (MagiErrors are reported, not fatal)."""
    editing = _readline(history_file)
    prompt = "you> " if sys.stdin.isatty() else ""
    if editing is not None:
        print("magi chat: /help for commands, Ctrl-D to leave", file=sys.stderr)
    try:
        while True:
            try:
                text = input(prompt).strip()
            except EOFError:
                break
            except KeyboardInterrupt:  # Ctrl-C at the prompt drops the line, as in a shell
                print(file=sys.stderr)
                continue
            if text.lower() in ("quit", "exit", "/quit", "/exit"):
                break
            if text:
                _one(chat, commands, text)
    finally:
        if editing is not None:
            history_file.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                editing.write_history_file(history_file)
    return 0


def _one(chat: Chat, commands: dict[str, Callable[[], None]], text: str) -> None:
    try:
        if text.startswith("/"):
            name = text.split()[0].lower()
            if name == "/reset":
                chat.history = []
                print("(conversation forgotten)", file=sys.stderr)
            elif name == "/help":
                print(HELP)
            elif name in commands:
                commands[name]()
            else:
                print(f"unknown command {name}; /help lists them", file=sys.stderr)
            return
        chat.turn(text)
    except MagiError as exc:
        print(f"magi chat: {exc.message}", file=sys.stderr)
    except KeyboardInterrupt:  # Ctrl-C during an answer: the stream closes, which cancels the generation
        print("\n(stopped)", file=sys.stderr)
