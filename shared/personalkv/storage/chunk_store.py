"""`ChunkStore`: the per-user layout of photos, KV chunk blobs and concept manifests.

Callers: the ingest/mining pipeline (put_photo, put_chunk, then write_manifest), the Ask path
(read_manifest, get_chunk / get_chunk_by_key), and the deletion service (delete_concept,
delete_user; it also removes the Milvus entries). Nothing else builds object keys.

Layout in the underlying ObjectStore (every id validated before it becomes part of a key):

    users/<user>/concepts/<concept>/manifest.json
    users/<user>/concepts/<concept>/photos/<photo_id>.<ext>
    users/<user>/concepts/<concept>/chunks/<chunk_id>.kv
    users/<user>/conversations/<id>.json     a conversation's record (conversation_record)
    users/<user>/conversations/<id>/<turn>.<ext>   the photo of a turn the model saw
    stamps/<user>                        changes whenever any of the user's manifests does
    work/<user>/<concept>                the work ledger: one entry per concept in flight

A concept exists exactly when its manifest exists. The manifest is written last, after every
object it names (write_manifest checks they are there), and a put is atomic in every backend,
so a reader never sees a half-written concept. Deletion removes the manifest first, so the
concept vanishes at once, then its prefix; retrying after a crash finishes the job.

Concurrent writers (uploads to one concept, its mining and caching tasks, lease renewals) go
through `update_manifest`: read with a version, apply a change, write back with a
compare-and-set (`ObjectStore.put_if`), and on a lost race read again and re-apply. No writer
ever overwrites a manifest it has not seen, so no update is lost. `create_manifest` writes only
if there is no manifest yet.

The concepts stamp lets a reader that keeps something derived from all of a user's manifests
(the answering process's recognizer) learn with one small read that nothing changed. It lies
outside ``users/<user>/`` (no listing of the user's concepts sees it) and is deleted with the
user's last concept and by ``delete_user``: a reader that finds none reads the manifests. It is
written after every manifest write or delete that changes more than the work lease (renewals
do not touch it), so a reader that sees a stamp sees at least the manifests written before it.

The work ledger lets the reconciler find the concepts whose background work is pending or
running (``ConceptManifest.in_flight``) without reading every manifest: its cost follows the work
in flight, not the number of concepts. An entry is written *before* a manifest enters an
in-flight state and deleted *after* it leaves them, so every in-flight manifest has one; a crash
between the two leaves a stale entry (a ready concept listed), which the reconciler reads,
finds idle and removes once it is older than a grace period. ``work/complete`` marks a store
whose ledger was built (stores from before it get one full scan, ``ledger_complete``).

A manifest that does not parse (truncated, edited by hand) raises `DamagedManifestError` for
that concept alone: `read_manifests` (every listing of a user's concepts) reports and skips it
or puts a caller's stand-in in its place, and `delete_concept` removes it like any other.
"""

from __future__ import annotations

import io
import logging
import re
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime, timezone

from PIL import Image, UnidentifiedImageError
from pydantic import ValidationError
from tenacity import (
    RetryError, Retrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential,
)

from personalkv.config import StorageSettings
from personalkv.ids import (
    InvalidIdError,
    is_valid_id,
    user_scoped_digest,
    validate_concept_id,
    validate_hex_digest,
    validate_user_id,
)
from personalkv.conversation_record import ConversationRecord
from personalkv.images import PHOTO_FORMATS, ValidatedPhoto
from personalkv.manifest import ConceptManifest, PhotoRecord
from personalkv.storage.base import ObjectNotFound, ObjectStore, PreconditionFailed, StorageError
from personalkv.storage.factory import open_object_store

_EXT_BY_MEDIA_TYPE = dict(PHOTO_FORMATS.values())
_CHUNK_KEY_RE = re.compile(r"users/([^/]+)/concepts/([^/]+)/chunks/([0-9a-f]{64})\.kv")
_UNCONDITIONAL = object()
log = logging.getLogger(__name__)


class InvalidPhotoError(ValueError):
    """Bytes that are not a photo in one of PHOTO_FORMATS, or a wrong media type."""


class MissingObjectsError(StorageError):
    """write_manifest was asked to publish a manifest naming objects that are not stored."""


class DamagedManifestError(StorageError):
    """A concept's manifest is stored but cannot be read (not JSON, not a manifest, another
    concept's). Concerns that concept only; the parse error is chained, not in the message."""

    def __init__(self, user_id: str, concept_id: str) -> None:
        super().__init__(f"the manifest of {user_id}/{concept_id} is damaged")
        self.user_id, self.concept_id = user_id, concept_id


class ChunkStore:
    """Tenant-scoped photos, chunks and manifests over any ObjectStore (see module doc)."""

    def __init__(self, objects: ObjectStore) -> None:
        self.objects = objects

    @classmethod
    def open(cls, url: str | None = None, settings: StorageSettings | None = None) -> ChunkStore:
        """`ChunkStore(open_object_store(url, settings))`: what a service bootstrap calls."""
        return cls(open_object_store(url, settings))

    # -- keys -------------------------------------------------------------------------------
    @staticmethod
    def user_prefix(user_id: str) -> str:
        return f"users/{validate_user_id(user_id)}/"

    @classmethod
    def concept_prefix(cls, user_id: str, concept_id: str) -> str:
        return f"{cls.user_prefix(user_id)}concepts/{validate_concept_id(concept_id)}/"

    @classmethod
    def manifest_key(cls, user_id: str, concept_id: str) -> str:
        return cls.concept_prefix(user_id, concept_id) + "manifest.json"

    @classmethod
    def photo_key(cls, user_id: str, concept_id: str, photo_id: str, media_type: str) -> str:
        ext = _EXT_BY_MEDIA_TYPE.get(media_type)
        if ext is None:
            known = list(_EXT_BY_MEDIA_TYPE)
            raise InvalidPhotoError(f"media type {media_type!r} is not one of {known}")
        photo_id = validate_hex_digest(photo_id, "photo id")
        return f"{cls.concept_prefix(user_id, concept_id)}photos/{photo_id}.{ext}"

    @classmethod
    def stamp_key(cls, user_id: str) -> str:
        return f"stamps/{validate_user_id(user_id)}"

    @staticmethod
    def work_key(user_id: str, concept_id: str) -> str:
        return f"work/{validate_user_id(user_id)}/{validate_concept_id(concept_id)}"

    @classmethod
    def chunk_key(cls, user_id: str, concept_id: str, chunk_id: str) -> str:
        chunk_id = validate_hex_digest(chunk_id, "chunk id")
        return f"{cls.concept_prefix(user_id, concept_id)}chunks/{chunk_id}.kv"

    # -- photos -----------------------------------------------------------------------------
    def put_photo(
        self, user_id: str, concept_id: str, photo: bytes | ValidatedPhoto,
        media_type: str | None = None,
    ) -> PhotoRecord:
        """Store a reference photo; its id is sha256 over (user id, bytes), so two users who
        upload the same file get different ids and objects. Re-uploading is idempotent.

        ``photo``: a ``ValidatedPhoto`` (the service's uploads: format and size come from its
        validation, nothing is read again), or raw bytes (tools, tests), whose header is read
        here and must be one of ``PHOTO_FORMATS`` (and match ``media_type`` when given)."""
        if isinstance(photo, ValidatedPhoto):
            data, detected, width, height = photo.data, photo.media_type, photo.width, photo.height
        else:
            data = photo
            try:
                with Image.open(io.BytesIO(data)) as image:
                    fmt, (width, height) = image.format, image.size
            except (UnidentifiedImageError, OSError) as exc:
                raise InvalidPhotoError(f"not a readable image: {exc}") from None
            if fmt not in PHOTO_FORMATS:
                raise InvalidPhotoError(f"image format {fmt} is not one of {list(PHOTO_FORMATS)}")
            detected = PHOTO_FORMATS[fmt][0]
        if media_type is not None and media_type != detected:
            raise InvalidPhotoError(f"media type {media_type!r} given; the bytes are {detected}")
        photo_id = user_scoped_digest(user_id, data, domain="photo")
        key = self.photo_key(user_id, concept_id, photo_id, detected)
        self.objects.put(key, data, content_type=detected)
        return PhotoRecord(
            photo_id=photo_id, object_key=key, media_type=detected,
            width=width, height=height, bytes=len(data),
        )  # fmt: skip

    def get_photo(self, user_id: str, concept_id: str, photo_id: str) -> bytes:
        validate_hex_digest(photo_id, "photo id")
        for media_type in _EXT_BY_MEDIA_TYPE:
            key = self.photo_key(user_id, concept_id, photo_id, media_type)
            try:
                return self.objects.get(key)
            except ObjectNotFound:
                continue
        raise ObjectNotFound(f"no photo {photo_id} in concept {concept_id!r} of {user_id!r}")

    # -- chunks -----------------------------------------------------------------------------
    def put_chunk(self, user_id: str, concept_id: str, chunk_id: str, blob: bytes) -> str:
        """Store one encoded KV chunk under its content hash; return its object key."""
        key = self.chunk_key(user_id, concept_id, chunk_id)
        self.objects.put(key, blob)
        return key

    def get_chunk(self, user_id: str, concept_id: str, chunk_id: str) -> bytes:
        return self.objects.get(self.chunk_key(user_id, concept_id, chunk_id))

    def delete_chunk(self, user_id: str, concept_id: str, chunk_id: str) -> None:
        """Remove one chunk blob (one its manifest no longer names); absent is not an error."""
        self.objects.delete(self.chunk_key(user_id, concept_id, chunk_id))

    def has_chunk(self, user_id: str, concept_id: str, chunk_id: str) -> bool:
        return self.objects.exists(self.chunk_key(user_id, concept_id, chunk_id))

    def get_chunk_by_key(self, user_id: str, object_key: str) -> bytes:
        """Fetch a chunk by the object key a manifest or index entry holds, refusing any key
        that is not a chunk of `user_id`: index hits are data, not trusted pointers."""
        match = _CHUNK_KEY_RE.fullmatch(object_key) if isinstance(object_key, str) else None
        if match is None or match.group(1) != validate_user_id(user_id):
            raise InvalidIdError(f"object key {object_key!r} is not a chunk of user {user_id!r}")
        return self.get_chunk(user_id, match.group(2), match.group(3))

    # -- manifests --------------------------------------------------------------------------
    def write_manifest(
        self, manifest: ConceptManifest, *, check_objects: bool = True
    ) -> ConceptManifest:
        """Publish (atomically replace) a concept's manifest unconditionally; return what was
        stored. Only for a single writer (tools, tests): services use `update_manifest`.

        Refuses object keys that are not this concept's own photo/chunk keys and, with
        check_objects, keys whose objects are not stored yet (MissingObjectsError): the
        manifest must be the last thing written.
        """
        return self._publish(manifest, check_objects, _UNCONDITIONAL, stamp=True, was_in_flight=None)

    def create_manifest(self, manifest: ConceptManifest) -> ConceptManifest:
        """Publish a new concept's manifest; PreconditionFailed when the concept exists."""
        return self._publish(manifest, True, None, stamp=True, was_in_flight=False)

    def update_manifest(
        self, user_id: str, concept_id: str,
        change: Callable[[ConceptManifest], ConceptManifest | None], *,
        check_objects: bool = True, attempts: int = 100,
    ) -> ConceptManifest | None:
        """Compare-and-set read-modify-write of a concept's manifest (see module doc).

        `change(current)` returns the manifest to store, or None to leave `current` as it is
        (then `current` is returned). It may be called several times, always with the latest
        manifest, so it must be a pure function of its argument. Returns what is stored, or
        None when the concept does not exist (or is deleted meanwhile).
        """
        def attempt() -> ConceptManifest | None:
            current, version = self.read_manifest_versioned(user_id, concept_id)
            if current is None:
                return None
            wanted = change(current)
            if wanted is None:
                return current
            try:
                # A change of the lease alone (renewals, claims) leaves the stamp as it is.
                lease_only = wanted.model_copy(update={"lease_until": current.lease_until}) == current
                return self._publish(wanted, check_objects, version, stamp=not lease_only,
                                     was_in_flight=current.in_flight)
            except ObjectNotFound:  # deleted between our read and write
                return None

        # Another writer won (PreconditionFailed): back off a little (jittered, growing: uniform
        # in [0, 0.01 * 2**n] before re-apply n + 1, at most 0.5 s) and re-apply.
        try:
            return Retrying(retry=retry_if_exception_type(PreconditionFailed),
                            stop=stop_after_attempt(attempts),
                            wait=wait_random_exponential(multiplier=0.01, max=0.5))(attempt)
        except RetryError:
            raise StorageError(f"manifest {user_id}/{concept_id}: {attempts} concurrent updates "
                               "in a row lost the race; giving up") from None

    def _publish(self, manifest: ConceptManifest, check_objects: bool, version, *,
                 stamp: bool, was_in_flight: bool | None) -> ConceptManifest:
        """Write the manifest (compare-and-set against ``version`` unless unconditional), with
        the work ledger around it (module doc); ``was_in_flight``: the state it replaces
        (None: unknown)."""
        user, concept = manifest.user_id, manifest.concept_id
        photos, chunks = manifest.photos, manifest.chunks
        expected = [self.photo_key(user, concept, p.photo_id, p.media_type) for p in photos]
        expected += [self.chunk_key(user, concept, c.chunk_id) for c in chunks]
        for key, want in zip(manifest.object_keys(), expected, strict=True):
            if key != want:
                raise InvalidIdError(f"manifest names object {key!r}; expected {want!r}")
        if check_objects:
            # One LIST instead of a HEAD per object (S3 listings are strongly consistent).
            present = set(self.objects.list(self.concept_prefix(user, concept)))
            missing = [key for key in expected if key not in present]
            if missing:
                raise MissingObjectsError(
                    f"manifest {user}/{concept} names {len(missing)} unstored object(s), "
                    f"e.g. {missing[0]}; write blobs before the manifest"
                )
        stored = manifest.model_copy(update={"updated_at": datetime.now(timezone.utc)})
        key = self.manifest_key(user, concept)
        if stored.in_flight and was_in_flight is not True:  # before: never in flight unlisted
            self._put_work(user, concept)
        if version is _UNCONDITIONAL:
            self.objects.put(key, stored.to_json(), "application/json")
        else:
            self.objects.put_if(key, stored.to_json(), version, "application/json")
        if not stored.in_flight and was_in_flight is not False:  # after: it left the states
            self.objects.delete(self.work_key(user, concept))
        if stamp:
            self._touch_stamp(user)
        return stored

    # -- the work ledger ---------------------------------------------------------------------
    def _put_work(self, user_id: str, concept_id: str) -> None:
        self.objects.put(self.work_key(user_id, concept_id),
                         datetime.now(timezone.utc).isoformat().encode(), "text/plain")

    def work_in_flight(self) -> list[tuple[str, str]]:
        """(user, concept) of every ledger entry: the concepts in flight, and stale entries."""
        out = []
        for key in self.objects.list("work/"):
            parts = key.split("/")
            if len(parts) == 3 and is_valid_id(parts[1]) and is_valid_id(parts[2]):
                out.append((parts[1], parts[2]))
        return out

    def work_entry_time(self, user_id: str, concept_id: str) -> datetime | None:
        """When the ledger entry was written (None: no entry, or unreadable)."""
        try:
            return datetime.fromisoformat(self.objects.get(self.work_key(user_id, concept_id)).decode())
        except (ObjectNotFound, ValueError, UnicodeDecodeError):
            return None

    def drop_work(self, user_id: str, concept_id: str) -> None:
        """Remove a stale ledger entry (the reconciler, for a concept found idle)."""
        self.objects.delete(self.work_key(user_id, concept_id))

    def ledger_complete(self) -> bool:
        """Whether the ledger lists every in-flight concept (``mark_ledger_complete`` ran:
        a store written before the ledger existed needs one full scan first)."""
        return self.objects.exists("work/complete")

    def mark_ledger_complete(self) -> None:
        self.objects.put("work/complete", b"1", "text/plain")

    def add_work(self, user_id: str, concept_id: str) -> None:
        """List an in-flight concept found by a full scan (building the ledger)."""
        self._put_work(user_id, concept_id)

    def read_manifest(self, user_id: str, concept_id: str) -> ConceptManifest | None:
        return self.read_manifest_versioned(user_id, concept_id)[0]

    def read_manifest_versioned(
        self, user_id: str, concept_id: str
    ) -> tuple[ConceptManifest | None, str | None]:
        """(manifest, its version for a compare-and-set), or (None, None) when none exists."""
        try:
            data, version = self.objects.get_versioned(self.manifest_key(user_id, concept_id))
        except ObjectNotFound:
            return None, None
        try:
            manifest = ConceptManifest.from_json(data)
        except (ValidationError, ValueError) as exc:  # truncated, not JSON, not a manifest
            raise DamagedManifestError(user_id, concept_id) from exc
        if (manifest.user_id, manifest.concept_id) != (user_id, concept_id):
            raise DamagedManifestError(user_id, concept_id)  # another concept's, copied here
        return manifest, version

    def read_manifests(
        self, user_id: str,
        on_damaged: Callable[[DamagedManifestError], ConceptManifest | None] | None = None,
    ) -> list[ConceptManifest]:
        """The manifest of each of the user's concepts, by concept id. A damaged one never stops
        the listing: it is replaced by ``on_damaged(error)``, or skipped when that returns None
        (without ``on_damaged``: logged and skipped)."""
        out = []
        for concept_id in self.list_concepts(user_id):
            try:
                manifest = self.read_manifest(user_id, concept_id)
            except DamagedManifestError as exc:
                if on_damaged is None:
                    log.warning("skipping concept %s/%s: its manifest is damaged", user_id, concept_id)
                    continue
                manifest = on_damaged(exc)
            if manifest is not None:  # (None also: deleted between the listing and the read)
                out.append(manifest)
        return out

    def has_concept(self, user_id: str, concept_id: str) -> bool:
        """Whether the concept exists (its manifest is stored, readable or not)."""
        return self.objects.exists(self.manifest_key(user_id, concept_id))

    # -- conversations ------------------------------------------------------------------------
    @classmethod
    def conversation_key(cls, user_id: str, conversation_id: str) -> str:
        conversation_id = validate_hex_digest(conversation_id, "conversation id")
        return f"{cls.user_prefix(user_id)}conversations/{conversation_id}.json"

    @classmethod
    def conversation_folder(cls, user_id: str, conversation_id: str) -> str:
        """Where a conversation's turn photos lie (beside its record)."""
        return cls.conversation_key(user_id, conversation_id)[: -len(".json")] + "/"

    def create_conversation(self, record: ConversationRecord) -> ConversationRecord:
        """Store a new conversation's record; PreconditionFailed if the id exists."""
        key = self.conversation_key(record.user_id, record.conversation_id)
        self.objects.put_if(key, record.to_json(), None, "application/json")
        return record

    def read_conversation(self, user_id: str, conversation_id: str
                          ) -> tuple[ConversationRecord | None, str | None]:
        """(record, its version for a compare-and-set), or (None, None): no such conversation
        of this user (another user's id reads as missing: the key holds the caller's user)."""
        try:
            data, version = self.objects.get_versioned(self.conversation_key(user_id, conversation_id))
        except ObjectNotFound:
            return None, None
        record = ConversationRecord.from_json(data)
        if (record.user_id, record.conversation_id) != (user_id, conversation_id):
            raise StorageError(f"conversation at {user_id}/{conversation_id} belongs to another")
        return record, version

    def update_conversation(self, record: ConversationRecord, version: str) -> ConversationRecord:
        """Write ``record`` if the stored one is still at ``version`` (else PreconditionFailed;
        ObjectNotFound when it was ended meanwhile)."""
        stored = record.model_copy(update={"updated_at": datetime.now(timezone.utc)})
        self.objects.put_if(self.conversation_key(record.user_id, record.conversation_id),
                            stored.to_json(), version, "application/json")
        return stored

    def put_conversation_photo(self, user_id: str, conversation_id: str, turn: int,
                               photo: ValidatedPhoto) -> str:
        """Store the photo of a conversation's turn (the model saw it); returns its key."""
        ext = _EXT_BY_MEDIA_TYPE[photo.media_type]
        key = self.conversation_folder(user_id, conversation_id) + f"{int(turn)}.{ext}"
        self.objects.put(key, photo.data, content_type=photo.media_type)
        return key

    def get_conversation_photo(self, user_id: str, conversation_id: str, key: str) -> bytes:
        """A turn's photo by the key its record holds, refusing any key outside that
        conversation's folder: a record is data, not a trusted pointer."""
        folder = self.conversation_folder(user_id, conversation_id)
        if not key.startswith(folder) or "/" in key[len(folder):] or ".." in key:
            raise InvalidIdError(f"object key {key!r} is not a photo of this conversation")
        return self.objects.get(key)

    def list_conversations(self, user_id: str) -> list[ConversationRecord]:
        """The user's conversations, oldest first."""
        prefix = self.user_prefix(user_id) + "conversations/"
        records = []
        for key in self.objects.list(prefix):
            name = key[len(prefix):]
            if "/" in name or not name.endswith(".json"):
                continue
            record, _ = self.read_conversation(user_id, name[: -len(".json")])
            if record is not None:
                records.append(record)
        return sorted(records, key=lambda r: (r.created_at, r.conversation_id))

    def delete_conversation(self, user_id: str, conversation_id: str) -> bool:
        """Remove a conversation's record and photos; returns whether it existed. Idempotent."""
        key = self.conversation_key(user_id, conversation_id)
        existed = self.objects.exists(key)
        self.objects.delete(key)  # first: the conversation is gone for every process
        self.objects.delete_prefix(self.conversation_folder(user_id, conversation_id))
        return existed

    # -- the concepts stamp ------------------------------------------------------------------
    def concepts_stamp(self, user_id: str) -> str | None:
        """The user's concepts stamp (module doc); None when none was written (no manifest
        written since it was introduced, or the user was deleted)."""
        try:
            return self.objects.get(self.stamp_key(user_id)).decode()
        except ObjectNotFound:
            return None

    def _touch_stamp(self, user_id: str) -> None:
        self.objects.put(self.stamp_key(user_id), uuid.uuid4().hex.encode(), "text/plain")

    def list_concepts(self, user_id: str) -> list[str]:
        """Concepts of `user_id` that have a manifest (i.e. exist), sorted."""
        concepts = _valid_ids(self.objects.list_children(self.user_prefix(user_id) + "concepts/"))
        return [c for c in concepts if self.has_concept(user_id, c)]

    def list_users(self) -> list[str]:
        """Users with any stored object, sorted."""
        return _valid_ids(self.objects.list_children("users/"))

    # -- deletion ---------------------------------------------------------------------------
    def delete_concept(self, user_id: str, concept_id: str) -> int:
        """Delete a concept and every object under it; return the number of objects removed.
        Idempotent; after a crash half way, calling it again removes what is left."""
        manifest_key = self.manifest_key(user_id, concept_id)
        self.objects.delete(manifest_key)  # first: the concept is gone for readers from here on
        removed = self.objects.delete_prefix(self.concept_prefix(user_id, concept_id))
        self.objects.delete(self.work_key(user_id, concept_id))
        if self.list_concepts(user_id):
            self._touch_stamp(user_id)
        else:  # the user's last concept: nothing of theirs is left (no stamp reads as changed)
            self.objects.delete(self.stamp_key(user_id))
        return removed

    def delete_user(self, user_id: str) -> int:
        """Forget a user: every manifest first (all concepts vanish), then every object."""
        prefix = self.user_prefix(user_id)
        for concept_id in _valid_ids(self.objects.list_children(prefix + "concepts/")):
            self.objects.delete(self.manifest_key(user_id, concept_id))
        removed = self.objects.delete_prefix(prefix)
        self.objects.delete_prefix(f"work/{validate_user_id(user_id)}/")
        self.objects.delete(self.stamp_key(user_id))  # last: readers re-read (no manifests) till then
        return removed


def _valid_ids(names: Iterable[str]) -> list[str]:
    # A stray directory not made by ChunkStore must not turn a listing into an error.
    return [name for name in names if is_valid_id(name)]
