"""What a user writes, type-checked by mypy in the test command (``scripts/test.sh``): the
client's and the manager's methods exist with their real signatures and typed results."""

import asyncio

import gpugroups as gg


def remote() -> float:
    client = gg.Client("http://localhost:8888", token="secret")
    loaded = client.load("tiny-a", device_id=0)
    result = client.process("tiny-a", "Hello", num_predictions=5)
    best: float = result["predictions"][0]["probability"]
    return loaded["seconds"] + best


async def local() -> int:
    m = gg.Manager(devices="virtual:2x512MiB")
    loaded = await m.aload("tiny-a")
    device: int = loaded["device_id"]
    devices: int = m.state()["num_devices"]
    return device + devices


if __name__ == "__main__":
    asyncio.run(local())
