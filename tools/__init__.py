"""Scripts for measuring and moving work to other machines; not part of the installed package."""
