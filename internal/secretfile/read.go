package secretfile

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"strings"
	"unicode"
)

// maxSize is the largest secret file accepted.
const maxSize = 1 << 20

var (
	// ErrEmpty reports a secret file that is empty after trimming trailing
	// whitespace.
	ErrEmpty = errors.New("secret file is empty")

	// ErrTooLarge reports a secret file over 1 MiB.
	ErrTooLarge = errors.New("secret file is larger than 1 MiB")
)

// readSecret reads the file at path and trims trailing whitespace. Errors
// name the path and the problem, never the content.
func readSecret(path string) (string, error) {
	b, err := ReadRegular(path)
	if err != nil {
		return "", fmt.Errorf("secretfile: %w", err) // names the path
	}
	s := strings.TrimRightFunc(string(b), unicode.IsSpace)
	if s == "" {
		return "", fmt.Errorf("secretfile: read %s: %w", path, ErrEmpty)
	}
	return s, nil
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
