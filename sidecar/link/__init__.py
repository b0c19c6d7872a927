"""The runtime link: protocol v1 messages, their validation, and the aiohttp WebSocket server side."""
