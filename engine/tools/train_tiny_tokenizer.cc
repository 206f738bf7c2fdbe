// Build-time tool: trains the embedded tiny model's SentencePiece tokenizer from the committed
// corpus (engine/assets/tiny_tokenizer_corpus.txt) and writes it both as a .model file and as a C++
// source holding its bytes, which sparge_engine compiles in (engine/assets/embedded_assets.h).
//
// Usage: sparge_train_tiny_tokenizer --corpus FILE --vocab_size N --model_out FILE --cc_out FILE
//        sparge_train_tiny_tokenizer --corpus FILE --vocab_size N --expect FILE
// (the second form trains again and fails unless the bytes equal FILE: the reproducibility test).
//
// Training is deterministic (one thread, no sentence sampling or shuffling, fixed seed) so that a
// given corpus always yields the same bytes, and therefore the same token ids, on every machine
// with the same SentencePiece version.
#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <iterator>
#include <sstream>
#include <string>
#include <unordered_map>

namespace {

constexpr unsigned int kTrainingSeed = 20260101;

struct Flags {
  std::string corpus;
  std::string vocab_size = "512";
  std::string model_out;
  std::string cc_out;
  std::string expect;
};

bool ParseFlags(int argc, char** argv, Flags* flags) {
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string name = argv[i];
    const std::string value = argv[i + 1];
    if (name == "--corpus") {
      flags->corpus = value;
    } else if (name == "--vocab_size") {
      flags->vocab_size = value;
    } else if (name == "--model_out") {
      flags->model_out = value;
    } else if (name == "--cc_out") {
      flags->cc_out = value;
    } else if (name == "--expect") {
      flags->expect = value;
    } else {
      std::cerr << "unknown flag " << name << "\n";
      return false;
    }
  }
  const bool outputs = !flags->model_out.empty() && !flags->cc_out.empty();
  if (argc % 2 != 1 || flags->corpus.empty() || (!outputs && flags->expect.empty())) {
    std::cerr << "usage: " << argv[0]
              << " --corpus FILE --vocab_size N (--model_out FILE --cc_out FILE | --expect FILE)\n";
    return false;
  }
  return true;
}

// Writes to a temporary name first so that an interrupted build never leaves a truncated output
// that ninja would consider up to date.
bool WriteFileAtomically(const std::string& path, const std::string& bytes) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    if (!out.good()) {
      std::cerr << "cannot write " << tmp << "\n";
      return false;
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::cerr << "cannot rename " << tmp << " to " << path << "\n";
    return false;
  }
  return true;
}

std::string EmbeddingSource(const std::string& model_bytes) {
  std::ostringstream cc;
  cc << "// Generated at build time by engine/tools/train_tiny_tokenizer.cc from\n"
        "// engine/assets/tiny_tokenizer_corpus.txt. Do not edit.\n"
        "#include \"engine/assets/embedded_assets.h\"\n\n"
        "namespace sparge::engine {\n"
        "namespace {\n"
        "constexpr unsigned char kTinyTokenizerModel[] = {";
  for (size_t i = 0; i < model_bytes.size(); ++i) {
    if (i % 16 == 0) cc << "\n   ";
    cc << " " << static_cast<unsigned>(static_cast<unsigned char>(model_bytes[i])) << ",";
  }
  cc << "\n};\n"
        "}  // namespace\n\n"
        "std::string_view TinyTokenizerModel() {\n"
        "  return std::string_view(reinterpret_cast<const char*>(kTinyTokenizerModel),\n"
        "                          sizeof(kTinyTokenizerModel));\n"
        "}\n\n"
        "}  // namespace sparge::engine\n";
  return cc.str();
}

}  // namespace

int main(int argc, char** argv) {
  Flags flags;
  if (!ParseFlags(argc, argv, &flags)) return 2;

  sentencepiece::SetRandomGeneratorSeed(kTrainingSeed);
  // umT5's conventions: pad 0, eos 1, unk 2 and no bos. The corpus is small, so the vocabulary is
  // an upper bound (hard_vocab_limit off) rather than a demand the trainer may fail to meet.
  const std::unordered_map<std::string, std::string> args = {
      {"input", flags.corpus},
      {"model_type", "unigram"},
      {"vocab_size", flags.vocab_size},
      {"hard_vocab_limit", "false"},
      {"character_coverage", "1.0"},
      {"pad_id", "0"},
      {"eos_id", "1"},
      {"unk_id", "2"},
      {"bos_id", "-1"},
      {"num_threads", "1"},
      {"input_sentence_size", "0"},
      {"shuffle_input_sentence", "false"},
      {"minloglevel", "1"},
  };
  std::string model_bytes;
  const sentencepiece::util::Status status =
      sentencepiece::SentencePieceTrainer::Train(args, nullptr, &model_bytes);
  if (!status.ok()) {
    std::cerr << "SentencePiece training failed: " << status.ToString() << "\n";
    return 1;
  }

  // Round-trip check: the bytes must load and honour the special-id layout the engine relies on.
  sentencepiece::SentencePieceProcessor processor;
  const sentencepiece::util::Status load = processor.LoadFromSerializedProto(model_bytes);
  if (!load.ok() || processor.pad_id() != 0 || processor.eos_id() != 1 || processor.unk_id() != 2 ||
      processor.bos_id() != -1 || processor.GetPieceSize() > std::atoi(flags.vocab_size.c_str())) {
    std::cerr << "trained tokenizer does not have the expected layout\n";
    return 1;
  }

  if (!flags.expect.empty()) {
    std::ifstream in(flags.expect, std::ios::binary);
    const std::string expected((std::istreambuf_iterator<char>(in)),
                               std::istreambuf_iterator<char>());
    if (!in.good() && !in.eof()) {
      std::cerr << "cannot read " << flags.expect << "\n";
      return 1;
    }
    if (expected != model_bytes) {
      std::cerr << "retraining gave different bytes than " << flags.expect
                << ": tokenizer training is not reproducible\n";
      return 1;
    }
    std::cout << "tiny tokenizer reproducible (" << model_bytes.size() << " bytes)\n";
    return 0;
  }
  if (!WriteFileAtomically(flags.model_out, model_bytes)) return 1;
  if (!WriteFileAtomically(flags.cc_out, EmbeddingSource(model_bytes))) return 1;
  std::cout << "tiny tokenizer: " << processor.GetPieceSize() << " pieces, " << model_bytes.size()
            << " bytes\n";
  return 0;
}
