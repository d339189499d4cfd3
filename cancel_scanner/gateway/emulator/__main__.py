import sys

from cancel_scanner.gateway.emulator.command import serve

sys.exit(serve())
