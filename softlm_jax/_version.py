"""The library's version: one place, read by the package and by checkpoint manifests (no import of the
package top from inside it)."""
__version__ = "0.1.0"
