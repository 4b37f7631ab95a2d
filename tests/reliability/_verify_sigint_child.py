"""Child of test_verify_sigint: parallel verifies in a loop until Ctrl-C, as the CLI handles it."""

import sys

from sessionledger import SessionConfig, SessionEngine


def main(url: str) -> int:
    try:
        config = SessionConfig(lifecycle_hooks=False, durability="normal")
        with SessionEngine(url, config) as engine:
            for i in range(300):
                sid = engine.create(f"s{i}", state={"n": 0})
                for step in range(1, 20):
                    engine.update(sid, {"n": step})
            print("ready", flush=True)
            while True:
                assert engine.verify(workers=2).ok
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # spawned workers import this module too
    sys.exit(main(sys.argv[1]))
