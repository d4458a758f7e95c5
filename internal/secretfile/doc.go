// Package secretfile provides secrets that may be backed by a file and are
// re-read when that file changes.
//
// The worker accepts HUAWEICLOUD_SDK_AK_FILE, HUAWEICLOUD_SDK_SK_FILE,
// DLF_AUTH_TOKEN_FILE and NATS_PASSWORD_FILE (contract section 7). Each names
// a file whose content is the value; the value follows the file when it is
// rewritten in place, replaced by a rename, removed and re-created, or swapped
// the way Kubernetes updates a mounted Secret:
//
//	dir/..2024_a/sk        the real file
//	dir/..data -> ..2024_a  a symlink, replaced atomically on update
//	dir/sk -> ..data/sk     the path the worker is given
//
// A Kubernetes update writes a new ..2024_b directory, renames a temporary
// symlink over ..data and removes ..2024_a. The inode of dir/sk never changes,
// so a watch on the file alone would miss it. Watch therefore watches the
// parent directory of the path (and the directory of the resolved file when a
// symlink points elsewhere) with fsnotify, re-reads after a short debounce on
// any event there, and compares content. A slow poll (WithPollInterval,
// default 10s) re-reads the file as well, so the value converges even where
// events are lost: network and FUSE filesystems, inotify limits, a watched
// directory that was itself removed and re-created.
//
// # Content
//
// Trailing whitespace, including "\n" and "\r\n", is removed; leading and
// inner whitespace is kept. A file that is empty after trimming is an error at
// start and is ignored afterwards. Files over 1 MiB are refused.
//
// # Failures after start
//
// A re-read that fails (file missing, unreadable, empty, too large) keeps the
// last good value and logs a warning once per distinct failure; recovery is
// logged at info. Writing a file in place (truncate, then write) can be seen
// half way, as an empty file: that read is ignored and the write that follows
// is picked up by its own event.
//
// # Secrecy
//
// Values never reach logs or error strings: errors and log entries name the
// path and the problem only. Value implements fmt.Stringer and
// fmt.GoStringer with a redacted form, so a Value printed by accident does not
// leak either.
//
// # Hot path
//
// Get is one atomic load; it makes no system call and takes no lock, so it
// can be called per request.
//
// # AK and SK
//
// WatchPair watches an access key file and a secret key file as one: both
// are re-read together, through their symlinks so that both come from the
// same generation of a Kubernetes Secret volume, and published together,
// so Get never returns one new key beside one old after an atomic swap. A
// writer that replaces the two files one after the other still leaves a
// short window in which a request is signed with a mismatched pair; DLF
// rejects it with 401 and the worker retries. Such writers should keep the
// old key pair valid until both files have been replaced.
package secretfile
