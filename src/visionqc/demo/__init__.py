"""Seeded demo data and (later) tiny model builders."""
