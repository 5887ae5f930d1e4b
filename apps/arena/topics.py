"""arena's event topics and the keys that route them.

- POINTS (key "leaderboard"): a change of a user's points, for the leaderboard projection.
- TRANSFERS (key: recipient name): a debited transfer, to credit on the recipient's shard.
- SETTLEMENTS (key: sender name): the credit's outcome, to close or refund on the sender's shard.
- MEMBERSHIP (key: user name): joins and leaves, for the user's "my rooms" list.
- MESSAGES (key: "room:<id>"): every committed chat message (for realtime fan-out).
"""

POINTS = "arena.points"
TRANSFERS = "arena.transfers"
SETTLEMENTS = "arena.settlements"
MEMBERSHIP = "arena.membership"
MESSAGES = "arena.messages"
LEADERBOARD_KEY = "leaderboard"
