"""Channel servers: own the channels of their ring slot and fan each event out once per gateway."""
