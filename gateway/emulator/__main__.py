import sys

from gateway.emulator.command import serve

sys.exit(serve())
