package doccheck

import (
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// root is the repository, from this package's directory.
const root = "../.."

// source holds what the code of the repository says: its string
// literals.
type source struct {
	literals []string
}

// readSource parses every non-test Go file of the repository (but the
// pinned tools).
func readSource(t *testing.T) source {
	t.Helper()
	var src source
	fset := token.NewFileSet()
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (d.Name() == "tools" || d.Name() == "testdata" || strings.HasPrefix(d.Name(), ".")) && path != root {
			return filepath.SkipDir
		}
		if d.IsDir() || !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		f, err := parser.ParseFile(fset, path, nil, 0)
		if err != nil {
			return err
		}
		ast.Inspect(f, func(n ast.Node) bool {
			switch n := n.(type) {
			case *ast.BasicLit:
				if n.Kind == token.STRING {
					if s, err := strconv.Unquote(n.Value); err == nil {
						src.literals = append(src.literals, s)
					}
				}
			}
			return true
		})
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(src.literals) == 0 {
		t.Fatal("found no string literal in the code: the parser missed it")
	}
	return src
}

// hasMessage reports whether msg is a literal, or two literals joined.
func (s source) hasMessage(msg string) bool {
	if msg == "" {
		return false
	}
	for _, l := range s.literals {
		if l == msg {
			return true
		}
		if rest, ok := strings.CutPrefix(msg, l); ok && l != "" && slices.Contains(s.literals, rest) {
			return true
		}
	}
	return false
}

// docs returns the text of README.md and every file of docs/, by name.
func docs(t *testing.T) map[string]string {
	t.Helper()
	out := map[string]string{}
	paths, _ := filepath.Glob(filepath.Join(root, "docs", "*.md"))
	paths = append(paths, filepath.Join(root, "README.md"))
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		out[filepath.Base(p)] = string(b)
	}
	if len(out) < 5 {
		t.Fatalf("found only %d documents", len(out))
	}
	return out
}

var msgRE = regexp.MustCompile(`msg=(?:"((?:[^"\\]|\\.)*)"|([^\s"` + "`" + `|,)]+))`)

// TestQuotedLogMessagesExist: every msg="..." in the docs is a message
// the code logs.
func TestQuotedLogMessagesExist(t *testing.T) {
	src := readSource(t)
	n := 0
	for name, text := range docs(t) {
		for _, m := range msgRE.FindAllStringSubmatch(text, -1) {
			msg := m[2]
			if m[1] != "" {
				var err error
				if msg, err = strconv.Unquote(`"` + m[1] + `"`); err != nil {
					t.Errorf("%s: cannot read %s: %v", name, m[0], err)
					continue
				}
			}
			n++
			if !src.hasMessage(msg) {
				t.Errorf("%s quotes a log message the code does not write: %s", name, m[0])
			}
		}
	}
	if n < 20 {
		t.Errorf("found only %d quoted log messages in the docs: is the msg= convention still used?", n)
	}
}
