"""Dashboard widgets. Charts are drawn on Textual's line API from pure functions of a snapshot."""
