"""PatchCast shared core: pure, synchronous building blocks (no MQTT, no asyncio).

Everything here is importable and testable without a broker. `shared.transport` is the only
module that imports aiomqtt.
"""

__version__ = "0.1.0"
