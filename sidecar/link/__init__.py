"""The runtime link: the WebSocket server side (server.py: frames to the intake, phones claimed), the runtime
connections and their commands (connections.py: the SocketController; a new command is a struct in
sidecar/events/schema.py and a method here), an in-process socket controller, and fleet mode's controller that
reaches a socket through the replica that holds it (fleet_sockets.py)."""
