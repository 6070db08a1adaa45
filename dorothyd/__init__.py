"""dorothyd"""
