"""The runtime link: protocol v1 messages and their validation, the WebSocket server side with command
routing (a new command type goes in server.py and the protocol), an in-process socket controller, and fleet
mode's controller that reaches a socket through the replica that holds it (fleet_sockets.py)."""
