"""Peer-to-peer block exchange: agents serve verified blocks by content id to each other."""
