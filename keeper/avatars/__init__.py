"""Avatars: the fetcher (download, check, save) and the pass a sweep runs over due avatars."""
