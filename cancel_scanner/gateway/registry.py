"""The payment channels a daemon builds, in one list: a new channel is one line here (or one
``CHANNELS.with_channel(...)``), and a module of its own under gateway/."""

from __future__ import annotations

from cancel_scanner.gateway.channels import ChannelRegistry
from cancel_scanner.gateway.wechat_channel import WeChatChannel

CHANNELS = ChannelRegistry([WeChatChannel])
