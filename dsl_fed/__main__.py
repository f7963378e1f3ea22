import sys

try:
    from dsl_fed.cli import main
except KeyboardInterrupt:  # Ctrl-C before main() has its own handling
    print("dsl_fed: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
