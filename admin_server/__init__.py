"""admin_server"""
