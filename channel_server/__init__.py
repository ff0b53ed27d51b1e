"""channel_server"""
