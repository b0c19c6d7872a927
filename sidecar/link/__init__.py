"""The runtime link: protocol v1 messages and their validation, the WebSocket server side with command
routing (a new command type goes in server.py and the protocol), and an in-process socket controller."""
