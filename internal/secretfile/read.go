package secretfile

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"strings"
)

// maxSize is the largest secret file accepted.
const maxSize = 1 << 20

var (
	// ErrEmpty reports a secret file that is empty after trimming (Trim).
	ErrEmpty = errors.New("secret file is empty")

	// ErrTooLarge reports a secret file over 1 MiB.
	ErrTooLarge = errors.New("secret file is larger than 1 MiB")
)

// readSecret reads the file at path and trims it (Trim). Errors name the
// path and the problem, never the content.
func readSecret(path string) (string, error) {
	b, err := ReadRegular(path)
	if err != nil {
		return "", fmt.Errorf("secretfile: %w", err) // names the path
	}
	s := Trim(b)
	if s == "" {
		return "", fmt.Errorf("secretfile: read %s: %w", path, ErrEmpty)
	}
	return s, nil
}

// Trim is a secret file's content as the secret: without a leading
// UTF-8 byte order mark and without whitespace at either end, as the same
// value given in an environment variable is trimmed. An editor's BOM or a
// blank first line left in an SK file otherwise signed every request with
// the wrong key, and DLF's 401 said only that the signature did not match
// (found by review).
func Trim(b []byte) string {
	return strings.TrimSpace(strings.TrimPrefix(string(b), "\ufeff"))
}

// ReadRegular reads the regular file at path (OpenRegular), at most 1 MiB
// (ErrTooLarge). Errors name the path, never the content.
func ReadRegular(path string) ([]byte, error) {
	f, err := OpenRegular(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxSize+1))
	if err != nil {
		return nil, err
	}
	if len(b) > maxSize {
		return nil, &fs.PathError{Op: "read", Path: path, Err: ErrTooLarge}
	}
	return b, nil
}
