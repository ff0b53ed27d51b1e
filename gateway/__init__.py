"""Gateway servers: hold client websockets and fan each event out to them."""
