"""
The code that runs INSIDE the sandbox: nanochat/sandbox.py compiles this file once with the sandbox's
interpreter and sends the code object, then a JSON config, on the sandboxed `python -I -S -B`'s stdin.

It reads the config (stdin to EOF; the program then sees an empty stdin) and acts in one of three roles:
- "run":    execute a program as __main__ (plain "run this code": tools, execute_code);
- "serve":  the untrusted side of a verdict: load the model's program, answer "hello" with its load status,
            then answer each call request with the function's result in the tagged encoding below;
- "test":   the trusted side: define the task's helpers and `check`, call check(candidate) where candidate
            forwards every call to the "serve" process through a pipe, decode the reply itself and print the
            verdict, prefixed by the per-run token from the harness, on its private verdict fd.

"serve" and "test" run in two separate sandboxes (separate PID, mount and user namespaces and uids), so the
program cannot see the tester's process, memory, files or descriptors; the only link is the pair of pipes.

Standard library only (the project is not visible in the sandbox), and Python >= 3.8.

Wire format (both directions): a 4-byte big-endian length, then that many bytes of ASCII JSON. Values use
a tagged encoding that only ever decodes to plain builtins, so nothing with a custom __eq__ (or any other
behaviour) can cross: None, bool, str, list and finite floats/ints are JSON itself; everything else is a
one-key object: {"int": hex} (ints too long for decimal), {"float": "inf"|"-inf"|"nan"}, {"tuple": [...]},
{"set": [...]}, {"frozenset": [...]}, {"dict": [[key, value], ...]}, {"bytes": hex}, {"complex": [re, im]}.
"""
import os
import sys

MAX_DEPTH = 100            # nesting of lists/dicts/... in one value
_BIG_INT = 10 ** 4000      # beyond this, decimal conversion hits Python's int/str digit limit; use hex


# -----------------------------------------------------------------------------
# JSON through the C accelerator alone: `import json` pulls in re and enum, which cost as much as the
# interpreter's own start-up (~10-20 ms a process on a small machine); the accelerator's scanner and string
# escaper are all that is needed. Falls back to the json package on interpreters without _json.

class _ScanContext:
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    memo = None

    @staticmethod
    def parse_constant(name):
        raise ValueError(f"bare {name} is not part of the encoding")


try:
    import _json
    _scan = _json.make_scanner(_ScanContext())
    _escape = _json.encode_basestring_ascii
except (ImportError, AttributeError):  # pragma: no cover - every CPython has _json
    import json as _json_module
    _scan = _escape = None


def loads(text):
    """Strict JSON text -> Python (NaN/Infinity refused); ValueError when malformed or nested too deeply."""
    if _scan is None:
        return _json_module.loads(text, parse_constant=_ScanContext.parse_constant)
    try:
        value, end = _scan(text, 0)
    except StopIteration:
        raise ValueError("malformed JSON") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if text[end:].strip():
        raise ValueError("trailing data after JSON")
    return value


def dumps(value):
    """Python (None/bool/int/finite float/str/list/dict with str keys) -> ASCII JSON text."""
    if _escape is None:
        return _json_module.dumps(value, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    parts = []
    _dump(value, parts.append)
    return "".join(parts)


def _dump(value, out):
    t = type(value)
    if value is None:
        out("null")
    elif t is bool:
        out("true" if value else "false")
    elif t is str:
        out(_escape(value))
    elif t is int:
        out(int.__repr__(value))
    elif t is float:
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("non-finite float in JSON")
        out(float.__repr__(value))
    elif t is list:
        out("[")
        for i, item in enumerate(value):
            if i:
                out(",")
            _dump(item, out)
        out("]")
    elif t is dict:
        out("{")
        for i, (key, item) in enumerate(value.items()):
            if type(key) is not str:
                raise TypeError("JSON object keys must be str")
            out("," if i else "")
            out(_escape(key))
            out(":")
            _dump(item, out)
        out("}")
    else:
        raise TypeError(f"{t.__name__} is not JSON")


# -----------------------------------------------------------------------------
# the tagged encoding

def encode(value, depth=0):
    """Plain builtins -> JSON-ready structure. Exact type checks: subclasses are refused, not flattened."""
    if depth > MAX_DEPTH:
        raise ValueError("value nested too deeply to cross the sandbox boundary")
    t = type(value)
    if value is None or t is bool or t is str:
        return value
    if t is int:
        return value if -_BIG_INT < value < _BIG_INT else {"int": hex(value)}
    if t is float:
        if value != value:
            return {"float": "nan"}
        if value in (float("inf"), float("-inf")):
            return {"float": "inf" if value > 0 else "-inf"}
        return value
    if t is list:
        return [encode(v, depth + 1) for v in value]
    if t is tuple:
        return {"tuple": [encode(v, depth + 1) for v in value]}
    if t is set or t is frozenset:
        return {t.__name__: [encode(v, depth + 1) for v in value]}
    if t is dict:
        return {"dict": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]}
    if t is bytes:
        return {"bytes": value.hex()}
    if t is complex:
        return {"complex": [encode(value.real, depth + 1), encode(value.imag, depth + 1)]}
    raise TypeError(f"a {t.__name__} cannot cross the sandbox boundary")


def decode(data, depth=0):
    """JSON-ready structure (already parsed) -> plain builtins; raises ValueError on anything else."""
    if depth > MAX_DEPTH:
        raise ValueError("value nested too deeply")
    t = type(data)
    if data is None or t in (bool, str, int, float):
        return data
    if t is list:
        return [decode(v, depth + 1) for v in data]
    if t is not dict or len(data) != 1:
        raise ValueError("malformed value")
    (tag, body), = data.items()
    if tag == "int" and type(body) is str and len(body) < 100_000:
        return int(body, 16)
    if tag == "float" and body in ("inf", "-inf", "nan"):
        return float(body)
    if tag == "bytes" and type(body) is str:
        return bytes.fromhex(body)
    if type(body) is not list:
        raise ValueError(f"malformed {tag!r} value")
    if tag == "tuple":
        return tuple(decode(v, depth + 1) for v in body)
    if tag in ("set", "frozenset"):
        items = [decode(v, depth + 1) for v in body]
        try:
            return set(items) if tag == "set" else frozenset(items)
        except TypeError:
            raise ValueError(f"unhashable item in a {tag}") from None
    if tag == "dict":
        out = {}
        for pair in body:
            if type(pair) is not list or len(pair) != 2:
                raise ValueError("malformed dict item")
            try:
                out[decode(pair[0], depth + 1)] = decode(pair[1], depth + 1)
            except TypeError:
                raise ValueError("unhashable dict key") from None
        return out
    if tag == "complex" and len(body) == 2:
        parts = [decode(x, depth + 1) for x in body]
        if all(type(x) in (int, float) for x in parts):
            return complex(parts[0], parts[1])
    raise ValueError(f"unknown tag {tag!r}")


# -----------------------------------------------------------------------------
# framing

def write_frame(fd, obj):
    data = dumps(obj).encode("ascii")
    data = len(data).to_bytes(4, "big") + data
    while data:
        data = data[os.write(fd, data):]


def _read_exact(fd, n):
    parts, got = [], 0
    while got < n:
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            return None
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def read_frame(fd, max_bytes):
    """The next frame as parsed JSON; None at a clean EOF. ValueError for an oversized or malformed frame
    (json's own limits: deep nesting is a RecursionError, turned into ValueError here)."""
    header = _read_exact(fd, 4)
    if header is None:
        return None
    n = int.from_bytes(header, "big")
    if n > max_bytes:
        raise ValueError(f"frame of {n} bytes is over the {max_bytes}-byte limit")
    body = _read_exact(fd, n)
    if body is None:
        raise ValueError("truncated frame")
    try:
        return loads(body.decode("ascii"))
    except UnicodeDecodeError:
        raise ValueError("malformed frame: not ASCII") from None


def _error_text(exc):
    try:
        text = str(exc)
    except BaseException:
        text = "<unprintable>"
    return f"{type(exc).__name__}: {text[:2000]}" if text else type(exc).__name__


def _stdin_config():
    chunks = []
    while True:
        chunk = os.read(0, 1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
    devnull = os.open("/dev/null", os.O_RDONLY)
    os.dup2(devnull, 0)  # the program sees an empty stdin
    os.close(devnull)
    return loads(b"".join(chunks).decode("utf-8"))


# -----------------------------------------------------------------------------
# roles

def run_program(source):
    """Execute `source` as the real __main__ module (so pickling and multiprocessing find its functions);
    an uncaught exception prints its traceback without this runner's frame and exits with status 1.
    The module's globals (this file's, when run as -c) are cleared first, so only locals are used below."""
    import sys
    main_globals = sys.modules["__main__"].__dict__
    builtins_module = main_globals["__builtins__"]
    main_globals.clear()
    main_globals.update({"__name__": "__main__", "__builtins__": builtins_module, "__doc__": None})
    try:
        exec(compile(source, "<program>", "exec"), main_globals)
    except SystemExit:
        raise
    except BaseException as e:
        import traceback  # only now: it pulls in tokenize and re, ~20 ms on a small machine
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)
        sys.stderr.flush()
        sys.exit(1)


def serve(cfg):
    """The program's side of a check: load, say hello, answer calls until the tester hangs up."""
    req_fd, res_fd, max_bytes = cfg["req_fd"], cfg["res_fd"], cfg["max_frame_bytes"]
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(cfg["program"], "<program>", "exec"), namespace)
        hello = {"loaded": True}
    except BaseException as e:
        hello = {"error": _error_text(e)}
    write_frame(res_fd, hello)
    if "error" in hello:
        os._exit(0)
    while True:
        try:
            request = read_frame(req_fd, max_bytes)
        except ValueError:
            os._exit(1)
        if request is None:
            os._exit(0)
        try:
            fn = namespace.get(request["call"])
            if not callable(fn):
                raise NameError(f"the program defines no function {request['call']!r}")
            value = fn(*decode(request["args"]), **decode(request["kwargs"]))
            reply = {"value": encode(value)}
        except BaseException as e:
            reply = {"error": _error_text(e)}
        try:
            sys.stdout.flush()
        except BaseException:
            pass
        write_frame(res_fd, reply)


class CandidateError(Exception):
    """The program's function raised something that is not a plain builtin Exception, or the call failed."""


def _program_exception(text):
    """Rebuild the program's exception on the trusted side: the builtin class of that name when it is an
    ordinary Exception subclass (so a test may catch e.g. ValueError), else CandidateError. Only the name
    and the message cross, never an object."""
    import builtins
    name, _, message = text.partition(": ")
    cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(message)
        except Exception:
            pass
    return CandidateError(text)


def _where(exc, filename, source):
    """' at <test> line N: <source line>' for the innermost frame running `filename`, or ''."""
    found, tb = "", exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            lines = source.splitlines()
            line = lines[tb.tb_lineno - 1].strip()[:300] if 0 < tb.tb_lineno <= len(lines) else ""
            found = f" at {filename} line {tb.tb_lineno}: {line}"
        tb = tb.tb_next
    return found


def test(cfg):
    """The trusted side of a check; the verdict line goes to a private dup of stdout, and anything the test
    code prints goes to stderr."""
    verdict_fd = os.dup(1)
    os.dup2(2, 1)
    req_fd, res_fd, max_bytes, token = cfg["req_fd"], cfg["res_fd"], cfg["max_frame_bytes"], cfg["token"]
    entry = cfg["entry_point"]

    def verdict(passed, reason):
        line = f"{token} " + dumps({"passed": passed, "reason": reason[:4000]}) + "\n"
        os.write(verdict_fd, line.encode("utf-8", "backslashreplace"))
        os._exit(0)

    def receive():
        try:
            reply = read_frame(res_fd, max_bytes)
        except (ValueError, OSError) as e:
            raise CandidateError(f"unreadable reply from the program ({e})") from None
        if type(reply) is not dict:
            raise CandidateError("the program's process ended before it replied" if reply is None
                                 else "malformed reply from the program")
        return reply

    def candidate(*args, **kwargs):
        write_frame(req_fd, {"call": entry, "args": encode(list(args)), "kwargs": encode(dict(kwargs))})
        reply = receive()
        if "value" in reply and len(reply) == 1:
            try:
                return decode(reply["value"])
            except ValueError as e:
                raise CandidateError(f"the program returned an undecodable value ({e})") from None
        if type(reply.get("error")) is str and len(reply) == 1:
            raise _program_exception(reply["error"])
        raise CandidateError("malformed reply from the program")

    try:
        hello = receive()
    except CandidateError as e:
        verdict(False, f"the program did not load: {e}")
    if hello != {"loaded": True}:
        error = hello.get("error") if type(hello.get("error")) is str else "malformed hello"
        verdict(False, f"the program did not load: {error}")
    namespace = {"__name__": "__test__"}
    for name, source in (("<setup>", cfg["setup"]), ("<test>", cfg["test"])):
        try:
            exec(compile(source, name, "exec"), namespace)
        except BaseException as e:
            verdict(False, f"the task's {name} code failed: {_error_text(e)}")
    namespace[entry] = candidate  # tests may call the function by its own name, not only as `candidate`
    check = namespace.get(cfg["check"])
    if not callable(check):
        verdict(False, f"the task's test code defines no function {cfg['check']!r}")
    try:
        check(candidate)
    except BaseException as e:
        verdict(False, _error_text(e) + _where(e, "<test>", cfg["test"]))
    verdict(True, "passed")


def main():
    cfg = _stdin_config()
    role = cfg["role"]
    if role == "run":
        run_program(cfg["program"])
    elif role == "serve":
        serve(cfg)
    elif role == "test":
        test(cfg)
    else:
        raise SystemExit(f"unknown sandbox role {role!r}")


if __name__ == "__main__":
    main()
