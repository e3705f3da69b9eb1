package gossip

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
)

// ErrNoKeys is returned by ParseKeys for a key file that holds no key.
var ErrNoKeys = errors.New("gossip: key file holds no key")

// LoadKeys reads the gossip keys of the file at path; see ParseKeys for
// its format. It fails for a file that others than its owner may read.
func LoadKeys(path string) ([][]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("gossip key file: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("gossip key file: %w", err)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return nil, fmt.Errorf("gossip key file %s: mode %04o lets others read the keys: chmod 600 it", path, perm)
	}
	keys, err := ParseKeys(f)
	if err != nil {
		return nil, fmt.Errorf("gossip key file %s: %w", path, err)
	}
	return keys, nil
}

// ParseKeys reads gossip keys, one a line: the standard base64 encoding
// of 16, 24 or 32 random bytes (AES-128, -192 or -256), such as
// "head -c 32 /dev/urandom | base64" prints. Blank lines and lines that
// start with "#" are ignored. The first key is the primary: it encrypts
// what this host sends. Every key decrypts what it receives, so that a
// key is rotated without downtime by adding it second everywhere, then
// moving it first everywhere, then removing the old one.
func ParseKeys(r io.Reader) ([][]byte, error) {
	var keys [][]byte
	sc := bufio.NewScanner(r)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		key, err := base64.StdEncoding.DecodeString(line)
		if err != nil {
			return nil, fmt.Errorf("line %d: not base64: %w", n, err)
		}
		if l := len(key); l != 16 && l != 24 && l != 32 {
			return nil, fmt.Errorf("line %d: a key of %d bytes: want 16, 24 or 32", n, l)
		}
		for _, k := range keys {
			if bytes.Equal(k, key) {
				return nil, fmt.Errorf("line %d: the same key twice", n)
			}
		}
		keys = append(keys, key)
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if len(keys) == 0 {
		return nil, ErrNoKeys
	}
	return keys, nil
}
